"""Train one DETR run with Ray Train, on the local Ray or on a cluster (RAY_ADDRESS).

  python scripts/train.py                                  # the demo experiment on the demo data
  python scripts/train.py --config my.yaml --data /data/coco-shards --storage s3://bucket/runs \
      --name r50-baseline --workers 8 --gpus-per-worker 1 --pretrained detr-r50-e632da11.pth
  python scripts/train.py --set train.lr=2e-4 --set model.backbone=resnet101

--data is a directory (or URI) holding train/ and val/ shard directories. A run without --name
gets a new, unique name (printed, with the command that resumes it).

Rerunning with the same --name and --storage resumes the run from its latest checkpoint, with the
configuration it was started with (recorded in <storage>/<name>/detr_ray_run.json):
  - the same configuration: the run resumes; a finished run (its newest verified checkpoint has
    all its epochs) reports its final metrics again without starting Ray;
  - only train.epochs raised (--epochs, --set train.epochs=N): the run continues to N epochs;
  - anything else differs (fewer epochs too): refused, exit code 2, listing each differing key
    (stored -> requested). Choose a new --name for a separate run, or pass --resume-as-stored to
    resume with the stored configuration (this command's --config/--data/--set/... are then ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import sys
import time

from detr_ray.cli import invocation
from detr_ray.config import ConfigError, apply_overrides, experiment_from_dict, load_yaml
from detr_ray.data.storage import is_uri, join, list_dirs, read_bytes
from detr_ray.relaunch import plan_run
from detr_ray.train.trainer import build_trainer, default_storage, demo_experiment


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (model/data/train sections); default: the demo experiment")
    p.add_argument("--data", help="directory or URI with train/ and val/ shard directories; default: demo data")
    p.add_argument("--storage", default=default_storage(), help="run storage: local directory or s3://, gs:// URI")
    p.add_argument("--name", help="run name: rerun with it to resume (default: a new unique name)")
    p.add_argument(
        "--resume-as-stored",
        action="store_true",
        help="resume the run --name with its stored configuration, ignoring this command's settings",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers (data-parallel)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--pretrained", help="DETR checkpoint or ImageNet backbone: file, URL or 'torchvision'")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    return p.parse_args(argv)


def new_run_name() -> str:
    return f"detr-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def finished_state(run_dir: str, epochs: int) -> dict | None:
    """The state.json of the run's newest verified checkpoint (the one a resume starts from)
    when that checkpoint has all `epochs`; None when the run has epochs left to train."""
    from detr_ray import checkpoint as ckpt

    names = [n for n in list_dirs(run_dir) if n.startswith("checkpoint_")]
    newest = ckpt.latest_valid([join(run_dir, n) for n in names])
    if newest is None:
        return None
    state = json.loads(read_bytes(join(newest, ckpt.STATE)))  # verified: hashed in the manifest
    return state if state["epoch"] >= epochs else None


def report_best(run_dir: str) -> None:
    from detr_ray.checkpoint import best_checkpoint

    # The best checkpoint by val/AP that verifies (every file's hash), as tune.py and evaluate.py choose.
    best, value = best_checkpoint(run_dir, "val/AP", "max")
    print(
        f"run directory: {run_dir}\nbest verified checkpoint: "
        + (f"{best} (val/AP {value:.3f})" if best else "none (no verified checkpoint with val/AP)")
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raw = load_yaml(args.config) if args.config else demo_experiment()
        raw = {k: dict(v or {}) for k, v in raw.items()}
        if args.data:
            raw.setdefault("data", {}).update(train=join(args.data, "train"), val=join(args.data, "val"))
        for key, value in (
            ("epochs", args.epochs),
            ("num_workers", args.workers),
            ("gpus_per_worker", args.gpus_per_worker),
            ("pretrained", args.pretrained),
        ):
            if value is not None:
                raw.setdefault("train", {})[key] = value
        raw = apply_overrides(raw, args.set)
        exp = experiment_from_dict(raw, args.config or "demo experiment")
        storage = args.storage if is_uri(args.storage) else os.path.abspath(args.storage)
        if args.name is None:
            if args.resume_as_stored:
                raise ConfigError("--resume-as-stored needs the --name of the run to resume")
            args.name = new_run_name()
            again = shlex.join([*invocation(), *argv, "--name", args.name, "--storage", storage])
            print(f"run name: {args.name}\nresume it with: {again}")
        run_dir = join(storage, args.name)
        plan = plan_run(run_dir, exp, as_stored=args.resume_as_stored)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.message, flush=True)
    exp = plan.experiment
    if plan.action != "start" and (final := finished_state(run_dir, exp.train.epochs)) is not None:
        m = final["metrics"]
        print(
            f"the run had finished: epoch {final['epoch']} of {exp.train.epochs}, "
            f"val/AP {m.get('val/AP', float('nan')):.3f}, val/AP50 {m.get('val/AP50', float('nan')):.3f}"
        )
        report_best(run_dir)
        return 0

    import ray

    context = ray.init(address=os.environ.get("RAY_ADDRESS"))
    print(f"Ray dashboard: http://{context.dashboard_url}" if context.dashboard_url else "Ray dashboard: not running")
    start = time.time()
    result = build_trainer(exp, name=args.name, storage_path=storage).fit()
    m = result.metrics or {}
    print(
        f"finished in {time.time() - start:.0f} s: epoch {m.get('epoch')}, val/AP {m.get('val/AP', float('nan')):.3f}, "
        f"val/AP50 {m.get('val/AP50', float('nan')):.3f}"
    )
    report_best(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
