#!/usr/bin/env python
"""Load test of the Serve endpoint against in-process batched inference of the same model on the
same images, in one run:

  (a) in process: ServedModel (decode + val transform + Predictor, the endpoint's own code, no
      HTTP, no Ray) on batches of --max-batch-size images, and one image at a time;
  (b) Serve: scripts/serve.py's app (detr_ray.serve.app.start) on a local Ray, HTTP on
      127.0.0.1 only; at each of --concurrency C, C client threads (stdlib http.client, one
      keep-alive connection each) POST the same JPEGs until --requests answers or --seconds
      have passed: throughput and p50/p90/p99 latency per request.
  serve_overhead = in-process batched images/s / Serve images/s at the highest concurrency.

Weights are random (speed does not depend on them); the checkpoint is a real one (ckpt.save).
--model demo: the demo's DETR (ResNet-18, 64 wide, 10 queries) on demo-sized JPEGs (64-96 px,
val shortest side 80): the per-request cost of Serve is most of the total. --model coco: DETR R50
in the COCO configuration on 640x480 JPEGs (shortest side 800): what a GPU machine should run.

    python benchmarks/serve.py                                    # CPU, ~2.5 minutes on 2 cores
    python benchmarks/serve.py --model coco --device gpu --concurrency 1 8 32 --max-batch-size 16 \
        --requests 2000 --seconds 60                               # a GPU machine

Writes benchmarks/results/serve_<device>.json (machine, command, date) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def make_jpegs(count: int, model: str, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        if model == "demo":
            width, height = (int(v) for v in rng.integers(64, 97, size=2))
        else:
            width, height = [(640, 480), (480, 640), (640, 427)][len(images) % 3]
        coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def make_checkpoint(root: Path, model: str) -> Path:
    import torch

    from detr_ray import checkpoint as ckpt
    from detr_ray.config import experiment_from_dict
    from detr_ray.model import build_model
    from detr_ray.train.trainer import demo_experiment

    if model == "demo":
        demo = demo_experiment()
        exp = experiment_from_dict(
            {
                **demo,
                "model": {**demo["model"], "num_classes": 3},
                "data": {"train": "unused", "val": "unused", "augment": "demo"},
            }
        )
        categories = {"label_to_category_id": [1, 2, 3], "names": ["circle", "square", "triangle"]}
    else:
        exp = experiment_from_dict(
            {"model": {"num_classes": 90}, "data": {"train": "unused", "val": "unused", "augment": "coco"}}
        )
        categories = {"label_to_category_id": list(range(1, 91)), "names": [f"c{i}" for i in range(1, 91)]}
    torch.manual_seed(0)
    return ckpt.save(
        root / "checkpoint",
        build_model(exp.model),
        None,
        None,
        None,
        ckpt.TrainingState(0, 0, exp.to_dict(), categories),
    )


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    p50, p90, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 90, 99])
    return {"p50_ms": round(float(p50), 1), "p90_ms": round(float(p90), 1), "p99_ms": round(float(p99), 1)}


def in_process(
    spec, images: list[bytes], batch_size: int, use_gpu: bool, threads: int, seconds: float, requests: int
) -> dict:
    """ServedModel's own path without HTTP or Ray: batches of `batch_size`, then one at a time."""
    import torch

    from detr_ray.serve.model import ServedModel

    model = ServedModel(spec, use_gpu=use_gpu, threads=threads)
    out = {"threads": threads, "device": model.device}

    def run(batch: int) -> dict:
        model.predict([model.prepare(images[i % len(images)]) for i in range(batch)])  # warm-up
        latencies, done, k = [], 0, 0
        start = time.perf_counter()
        while done < requests and time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            prepared = [model.prepare(images[(k + i) % len(images)]) for i in range(batch)]
            model.predict(prepared)
            if use_gpu:
                torch.cuda.synchronize()
            latencies.append(time.perf_counter() - t0)
            done += batch
            k += batch
        wall = time.perf_counter() - start
        return {
            "batch_size": batch,
            "images": done,
            "seconds": round(wall, 2),
            "images_per_s": round(done / wall, 2),
            **{k.replace("_ms", "_batch_ms"): v for k, v in percentiles(latencies).items()},
        }

    out["batched"] = run(batch_size)
    out["single"] = run(1)
    return out


def load(port: int, images: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` threads, one keep-alive connection each, POSTing until `requests` answers
    in all or `seconds` have passed."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + seconds

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if issued[0] >= requests:
                        return
                    k = issued[0]
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    conn.request(
                        "POST", "/detect", body=images[k % len(images)], headers={"Content-Type": "image/jpeg"}
                    )
                    response = conn.getresponse()
                    body = response.read()
                    ok = response.status == 200
                except (OSError, http.client.HTTPException) as e:
                    ok, body = False, repr(e).encode()
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                elapsed = time.perf_counter() - t0
                with lock:
                    (latencies.append(elapsed) if ok else errors.append(body[:200].decode(errors="replace")))
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 2),
        **percentiles(latencies),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(port: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            time.sleep(0.5)
    raise RuntimeError(f"the app on port {port} did not answer /healthz in {seconds} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("demo", "coco"), default="demo")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--images", type=int, default=32, help="distinct JPEGs, cycled")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument(
        "--requests", type=int, default=400, help="most requests per concurrency level (and in-process images)"
    )
    p.add_argument(
        "--seconds", type=float, default=20.0, help="most seconds per concurrency level (and in-process run)"
    )
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="CPU replica's CPUs = torch threads, also in process"
    )
    p.add_argument("--out", type=Path, help="default: benchmarks/results/serve_<device>.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    from detr_ray import local_ray
    from detr_ray.serve.app import ServeOptions, start, stop
    from detr_ray.serve.model import choose_checkpoint

    use_gpu = args.device == "gpu"
    if use_gpu and not torch.cuda.is_available():
        print("error: --device gpu, but torch sees no GPU", file=sys.stderr)
        return 2
    threads = max(1, int(args.cpus_per_replica))
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        },
        "model": {
            "demo": (
                "demo DETR (ResNet-18, hidden 64, 10 queries), random weights, fp32, images 64-96 px, "
                "val shortest side 80"
            ),
            "coco": (
                "DETR R50 (COCO configuration, 100 queries), random weights, fp32, 640x480-class JPEGs, "
                "val shortest side 800"
            ),
        }[args.model],
        "options": {
            "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            "cpus_per_replica": args.cpus_per_replica,
            "requests_per_level": args.requests,
            "seconds_per_level": args.seconds,
            "images": args.images,
        },
    }
    images = make_jpegs(args.images, args.model)
    with tempfile.TemporaryDirectory(prefix="detr-serve-bench-") as root:
        checkpoint = make_checkpoint(Path(root), args.model)
        spec = choose_checkpoint(checkpoint=str(checkpoint), workdir=root)
        print(f"in process ({args.max_batch_size} per batch, then 1) ...", flush=True)
        record["in_process"] = in_process(
            spec, images, args.max_batch_size, use_gpu, threads, args.seconds, args.requests
        )
        local_ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = None
        try:
            port = _free_port()
            options = ServeOptions(
                max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_ms / 1000,
                cpus_per_replica=args.cpus_per_replica,
                use_gpu=use_gpu,
            )
            t0 = time.perf_counter()
            started = start(spec, options, port=port)
            _wait_until_up(port)
            record["serve_start_s"] = round(time.perf_counter() - t0, 1)
            load(port, images, 2, 8, 60)  # warm-up: the replica's first batches, connections
            record["serve"] = []
            for c in args.concurrency:
                print(f"Serve, {c} concurrent client(s) ...", flush=True)
                record["serve"].append(load(port, images, c, args.requests, args.seconds))
        finally:
            if started is not None:
                stop(started=started)
            ray.shutdown()
    batched = record["in_process"]["batched"]["images_per_s"]
    best = max(record["serve"], key=lambda r: r["images_per_s"])
    record["serve_overhead"] = {
        "in_process_batched_images_per_s": batched,
        "serve_best_images_per_s": best["images_per_s"],
        "at_concurrency": best["concurrency"],
        "ratio": round(batched / best["images_per_s"], 2) if best["images_per_s"] else None,
    }
    out = args.out or RESULTS / f"serve_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    inp = record["in_process"]
    print(
        f"\n{record['model']}\nmachine: {os.cpu_count()} CPUs, {record['machine']['gpu'] or 'no GPU'}; "
        f"load average at start {record['machine']['load_average_at_start']}"
    )
    print(f"{'path':34s}{'images/s':>10s}{'p50 ms':>9s}{'p90 ms':>9s}{'p99 ms':>9s}{'n':>6s}")
    for name, r in (
        ("in process, batch %d" % args.max_batch_size, inp["batched"]),
        ("in process, batch 1", inp["single"]),
    ):
        print(
            f"{name + ' (per batch)':34s}{r['images_per_s']:>10.1f}{r['p50_batch_ms']:>9.1f}"
            f"{r['p90_batch_ms']:>9.1f}{r['p99_batch_ms']:>9.1f}{r['images']:>6d}"
        )
    for r in record["serve"]:
        print(
            f"{'Serve HTTP, concurrency %d' % r['concurrency']:34s}{r['images_per_s']:>10.1f}"
            f"{r['p50_ms'] or 0:>9.1f}{r['p90_ms'] or 0:>9.1f}{r['p99_ms'] or 0:>9.1f}{r['requests']:>6d}"
            + (f"  errors {r['errors']}: {r['first_error']}" if r["errors"] else "")
        )
    o = record["serve_overhead"]
    print(
        f"Serve overhead: in-process batched {o['in_process_batched_images_per_s']} images/s / "
        f"Serve {o['serve_best_images_per_s']} "
        f"(concurrency {o['at_concurrency']}) = {o['ratio']}x\nwrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
