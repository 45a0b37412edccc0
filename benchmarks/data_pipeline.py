#!/usr/bin/env python
"""Images per second delivered to a training consumer, DETR's COCO train transforms, in one run:

  (a) this project's pipeline: Parquet shards -> Ray Data (read_parquet fused with map_batches:
      torchvision.io decode + DetectionTransform, which calls transforms.v2's kernels directly) ->
      DetectionBatches (local shuffle + collate);
  (b) the common approach: torchvision CocoDetection (PIL decode) + the same recipe as a
      v2.Compose pipeline (on PIL images) + a torch DataLoader with one worker per core + the same
      padding collate. (On tensors, DetectionTransform and the v2.Compose pipeline give identical
      outputs for the same seed: tests/data/test_transforms.py.)

Both read the same generated COCO-sized JPEGs (640x480, 480x640, 640x427). After an untimed
warm-up pass each, timed passes of (b) and (a) alternate (so that other load on the machine hits
both); images/s is the best pass of each, and the CPU time of all processes involved (Ray's
raylet, GCS and workers included for (a)) per delivered image is reported too, as it is less
sensitive to other load. Writes benchmarks/results/data_pipeline.json with the CPU count.

    python benchmarks/data_pipeline.py [--images 640] [--rounds 3] [--batch-size 8] [--no-scheduling-patch]

--no-scheduling-patch (formerly --no-ray-data-fixes) runs (a) without
detr_ray.data.ray_data_scheduling_patch (DETR_RAY_DATA_SCHEDULING_PATCH=0, set before Ray starts so
that its worker processes inherit it): the ablation that measures it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detr_ray.data.coco import load_coco
from detr_ray.data.recipe import TransformConfig
from detr_ray.data.shards import write_shards
from detr_ray.data.transforms import build_train_transform, normalized_cxcywh

RESULTS = Path(__file__).parent / "results" / "data_pipeline.json"
SIZES = [(480, 640), (640, 480), (427, 640)]  # (height, width), as COCO's


def make_images(root: Path, count: int, seed: int = 0) -> Path:
    """COCO-like JPEGs (textured, ~100-200 KB) with 1-4 boxes each, and their instances JSON."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        coarse = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0, 18, size=pixels.shape)
        for k in range(int(rng.integers(1, 5))):
            bw, bh = int(rng.integers(40, w // 2)), int(rng.integers(40, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = rng.uniform(0, 255, size=3)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": int(k % 3) + 1,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / name, quality=90)
        coco["images"].append({"id": i + 1, "file_name": name, "width": w, "height": h})
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def pad_collate(samples):
    """(image uint8 [3,h,w], target) pairs -> padded images, mask, targets (as pipeline.collate)."""
    h = max(s[0].shape[1] for s in samples)
    w = max(s[0].shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, h, w, dtype=torch.uint8)
    mask = torch.ones(len(samples), h, w, dtype=torch.bool)
    for k, (image, _) in enumerate(samples):
        images[k, :, : image.shape[1], : image.shape[2]] = image
        mask[k, : image.shape[1], : image.shape[2]] = False
    return images, mask, [t for _, t in samples]


class PilDetection(torch.utils.data.Dataset):
    """CocoDetection (PIL) wrapped for transforms v2, then the same train recipe."""

    def __init__(self, root: Path, cfg: TransformConfig):
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

        base = CocoDetection(str(root / "images"), str(root / "instances.json"))
        self.ds = wrap_dataset_for_transforms_v2(base, target_keys=("boxes", "labels", "image_id"))
        self.transform = build_train_transform(cfg)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from torchvision.transforms.v2 import functional as F

        image, target = self.ds[i]
        out = self.transform({"image": image, "boxes": target["boxes"], "labels": target["labels"]})
        tensor = F.pil_to_tensor(out["image"])
        h, w = tensor.shape[-2:]
        boxes = normalized_cxcywh(out["boxes"].as_subclass(torch.Tensor), h, w)
        return tensor, {"boxes": boxes, "labels": out["labels"], "image_id": target["image_id"]}


# --------------------------------------------------------------------------------------------
# Measuring: wall time and the CPU time of every process involved


def _process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds used so far, command line) from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, cmdline)
    return table


def cpu_seconds(include_ray: bool) -> dict[int, float]:
    """pid -> CPU seconds of this process and its descendants. Without include_ray, only the
    processes running this script (DataLoader workers are forks of it), not Ray's raylet, GCS
    and workers."""
    table = _process_table()
    me = os.getpid()
    own_cmdline = table[me][2]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    used, stack = {}, [me]
    while stack:
        pid = stack.pop()
        if pid != me and not include_ray and table[pid][2] != own_cmdline:
            continue
        used[pid] = table[pid][1]
        stack += children.get(pid, [])
    return used


def measure_epoch(make_iter, include_ray: bool) -> dict[str, float]:
    """One pass: images/s, and CPU-ms per image summed over the processes involved (a process
    that ends during the pass is not counted; in steady state none does)."""
    before, start, images = cpu_seconds(include_ray), time.perf_counter(), 0
    for batch in make_iter():
        images += batch[0].shape[0]
    wall = time.perf_counter() - start
    after = cpu_seconds(include_ray)
    cpu = sum(t - before.get(pid, 0.0) for pid, t in after.items())
    return {"images_per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images}


# --------------------------------------------------------------------------------------------
# The two pipelines


def ray_pipeline(root: Path, cfg: TransformConfig, batch_size: int, cpus: int, decode_num_cpus: float = 1.0):
    """Shards the images (untimed, a one-off cost), starts Ray; returns a pass factory."""
    import ray
    import ray.data

    from detr_ray.data.batches import DetectionBatches
    from detr_ray.data.datasets import train_dataset
    from detr_ray.local_ray import init as init_local_ray

    shards = root / "shards"
    write_shards(
        load_coco(str(root / "instances.json")),
        str(root / "images"),
        str(shards),
        shard_size=64,
        workers=0,
        progress=False,
    )
    # As scripts/tune.py starts its local Ray: idle workers are kept (a plain ray.init keeps only as
    # many as there are unreserved CPUs and restarted a torch-importing worker every few tasks).
    init_local_ray(
        address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    iterator = train_dataset(str(shards), cfg, decode_batch_size=16, decode_num_cpus=decode_num_cpus).iterator()
    batches = DetectionBatches(iterator, batch_size=batch_size, shuffle_buffer=2 * batch_size)
    return lambda: iter(batches)


def dataloader_pipeline(root: Path, cfg: TransformConfig, batch_size: int, cpus: int):
    loader = torch.utils.data.DataLoader(
        PilDetection(root, cfg),
        batch_size=batch_size,
        shuffle=True,
        num_workers=cpus,
        collate_fn=pad_collate,
        persistent_workers=True,
        prefetch_factor=2,
    )
    return lambda: iter(loader)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--rounds", type=int, default=3, help="timed passes of each, interleaved, after a warm-up")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--decode-num-cpus", type=float, default=1.0, help="CPU reservation of one decode task")
    p.add_argument(
        "--no-scheduling-patch",
        "--no-ray-data-fixes",
        dest="no_scheduling_patch",
        action="store_true",
        help="run (a) without detr_ray.data.ray_data_scheduling_patch (ablation; --no-ray-data-fixes: its former name)",
    )
    args = p.parse_args(argv)
    if args.no_scheduling_patch:  # before anything imports the pipeline or starts Ray
        from detr_ray.data import ray_data_scheduling_patch

        os.environ[ray_data_scheduling_patch.ENV_SWITCH] = "0"
    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    cfg = TransformConfig.coco()
    torch.set_num_threads(1)  # the consumer: one thread, as a training loop's data side would get

    with tempfile.TemporaryDirectory() as tmp:
        root = make_images(Path(tmp), args.images)
        print(
            f"{args.images} JPEGs, {cpus} CPUs, batch {args.batch_size}, {args.rounds} rounds, "
            f"ray_data_scheduling_patch {'off' if args.no_scheduling_patch else 'on'}"
        )
        # DataLoader first, so that its workers are forks of this process and not of Ray's.
        passes = {"b": dataloader_pipeline(root, cfg, args.batch_size, cpus)}
        passes["a"] = ray_pipeline(root, cfg, args.batch_size, cpus, args.decode_num_cpus)
        for name in ("b", "a"):  # warm-up: worker start-up, imports
            for _ in passes[name]():
                pass
        rounds: dict[str, list] = {"a": [], "b": []}
        for r in range(args.rounds):  # interleaved, so that other load on the machine hits both
            for name in ("b", "a"):
                rounds[name].append(measure_epoch(passes[name], include_ray=name == "a"))
                m = rounds[name][-1]
                print(
                    f"  round {r} ({name}): {m['images_per_s']:6.1f} images/s, {m['cpu_ms_per_image']:5.1f} "
                    "CPU-ms/image"
                )
    best = {k: max(m["images_per_s"] for m in v) for k, v in rounds.items()}
    cpu_ms = {k: statistics.median(m["cpu_ms_per_image"] for m in v) for k, v in rounds.items()}
    ratio = best["a"] / best["b"]
    print(
        f"(a) Parquet shards + Ray Data pipeline:              {best['a']:7.1f} images/s (best round), "
        f"{cpu_ms['a']:.1f} CPU-ms/image (median, all Ray processes)"
    )
    print(
        f"(b) CocoDetection (PIL) + DataLoader({cpus} workers):    {best['b']:7.1f} images/s (best round), "
        f"{cpu_ms['b']:.1f} CPU-ms/image (median)"
    )
    print(f"ratio (a)/(b): {ratio:.2f}x images/s, {cpu_ms['b'] / cpu_ms['a']:.2f}x CPU efficiency")
    dataloader, pipeline = best["b"], best["a"]
    from detr_ray.data import ray_data_scheduling_patch

    ray_data_scheduling_patch_in_place = ray_data_scheduling_patch.installed()

    import ray
    import torchvision

    result = {
        "cpu_count": cpus,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "images": args.images,
        "image_sizes_hw": SIZES,
        "batch_size": args.batch_size,
        "timed_rounds": args.rounds,
        "transforms": "DETR COCO train recipe (TransformConfig.coco())",
        "ray_data_scheduling_patch": not args.no_scheduling_patch,
        # as found in this driver after the runs
        "ray_data_scheduling_patch_in_place": ray_data_scheduling_patch_in_place,
        "ray_data_pipeline_images_per_s": round(pipeline, 2),
        "torch_dataloader_pil_images_per_s": round(dataloader, 2),
        "ratio": round(ratio, 3),
        "ray_data_pipeline_cpu_ms_per_image": round(cpu_ms["a"], 2),
        "torch_dataloader_pil_cpu_ms_per_image": round(cpu_ms["b"], 2),
        "cpu_efficiency_ratio": round(cpu_ms["b"] / cpu_ms["a"], 3),
        "rounds": rounds,
        "load_average_1m_before": round(load_before, 2),  # other work on the machine skews both
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
