"""Serve a verified checkpoint as an HTTP detection endpoint (Ray Serve), until Ctrl-C or SIGTERM.

  python scripts/serve.py --experiment runs/demo-sweep               # the sweep's best checkpoint
  python scripts/serve.py --checkpoint runs/detr-demo/checkpoint_epoch0010 --port 8080
  RAY_ADDRESS=auto python scripts/serve.py --experiment s3://bucket/sweeps/r50   # on a cluster
  python scripts/serve.py --checkpoint detr-r50-e632da11.pth --data coco/val  # published weights

  curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/detect?score_threshold=0.7'
  curl -s -F image=@photo.jpg http://127.0.0.1:8000/detect
  curl -s http://127.0.0.1:8000/model ; curl -s http://127.0.0.1:8000/healthz

The checkpoint is chosen and verified (manifest hashes) as evaluate.py chooses it, and each
replica loads it again only if it still matches that manifest. Listens on 127.0.0.1 unless
--host says otherwise. On a cluster (--address or RAY_ADDRESS), a local checkpoint directory must
be readable on every node that runs a replica (shared storage), or give a URI.
Published DETR weights are read as evaluate.py reads them (architecture from the tensors, class
head mapped to the categories of --data); each replica converts the file itself and serves it only
if its sha256 is the one chosen at start. Categories the file has no class for are refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading

from detr_ray.checkpoint import CheckpointError
from detr_ray.cli.arguments import add_model_source
from detr_ray.config import ConfigError
from detr_ray.evaluation.subject import EvaluationTargetError
from detr_ray.serve.model import DEFAULT_MAX_BODY_BYTES, DEFAULT_SCORE_THRESHOLD, choose_checkpoint

log = logging.getLogger("serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(
        p,
        checkpoint_metavar="DIR_FILE_OR_URI",
        checkpoint_help="a checkpoint directory (checkpoint_epochNNNN) or published DETR weights "
        "(.pth file, URL; needs --data)",
    )
    p.add_argument(
        "--data",
        metavar="SHARDS",
        help="published weights: the shards whose categories (_meta.json) the class head is mapped to",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="published weights: a setting the file cannot tell, e.g. model.dilation=true",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no --address)")
    p.add_argument("--name", default="detr", help="Serve application name")
    p.add_argument("--max-batch-size", type=int, default=8, help="most images per forward pass (dynamic batching)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill")
    p.add_argument("--replicas", type=int, help="replicas (default: one per GPU, else one CPU replica)")
    p.add_argument(
        "--autoscale", type=int, nargs=2, metavar=("MIN", "MAX"), help="autoscale between MIN and MAX replicas instead"
    )
    p.add_argument("--target-ongoing", type=float, default=8.0, help="requests per replica the autoscaler aims at")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs (and torch threads) of a CPU replica")
    p.add_argument(
        "--device", choices=("auto", "gpu", "cpu"), default="auto", help="auto: GPU replicas when the cluster has GPUs"
    )
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20, help="largest request body")
    p.add_argument(
        "--max-pixels",
        type=int,
        help="largest image (width x height) by its header (default: images.DEFAULT_MAX_PIXELS)",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=DEFAULT_SCORE_THRESHOLD,
        help="default of the score_threshold query parameter",
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds before the proxy gives up on a request")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from detr_ray import local_ray
    from detr_ray.serve.app import ServeOptions, start, stop

    workdir = tempfile.TemporaryDirectory(prefix="detr-serve-")  # copies of checkpoints behind URIs
    try:
        options = ServeOptions(
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000,
            num_replicas=args.replicas,
            autoscale=tuple(args.autoscale) if args.autoscale else None,
            target_ongoing_requests=args.target_ongoing,
            cpus_per_replica=args.cpus_per_replica,
            use_gpu={"auto": None, "gpu": True, "cpu": False}[args.device],
            max_body_bytes=int(args.max_body_mb * 2**20),
            score_threshold=args.score_threshold,
            **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
        ).validate()
        spec = choose_checkpoint(
            experiment=args.experiment,
            checkpoint=args.checkpoint,
            workdir=workdir.name,
            data=args.data,
            overrides=args.set,
        )
    except (EvaluationTargetError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        local_ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    # after ray.init, which installs a SIGTERM handler that aborts the process
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    started = None  # set once the app is deployed: `start` undoes its own half-done work
    try:
        started = start(
            spec, options, host=args.host, port=args.port, name=args.name, request_timeout_s=args.request_timeout
        )
        print(
            f"serving {spec.identity['checkpoint']} (manifest {spec.identity['manifest_sha256'][:12]}) "
            f"at http://{args.host}:{args.port}/detect ; Ctrl-C to stop",
            flush=True,
        )
        while not stopping.wait(0.5):
            pass
        log.info("stopping")
    except Exception as e:  # no GPUs for --device gpu, a replica that cannot load the checkpoint, a port in use
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        try:
            if started is not None:
                stop(args.name, started)
        finally:
            ray.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
