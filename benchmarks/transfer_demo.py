"""Does fine-tuning from a demo model pre-trained on part of the categories reach the from-scratch
demo's AP in fewer epochs? Three runs, one after the other, on one local Ray:

  1. pre-training: the demo model on rectangle + triangle only (detr_ray/train/demo_pretrain.py,
     demo images of another seed), into a fresh cache directory so that its cost is measured;
  2. from scratch: the demo experiment (scripts/train.py's default) on the demo shards;
  3. fine-tuning: the same experiment, same shards and seed, with train.pretrained = (1):
     rectangle and triangle map by id, ellipse is new.

    python benchmarks/transfer_demo.py [--epochs 8] [--pretrain-epochs 6]

Prints val/AP per epoch of (2) and (3), the epochs each needs to reach (2)'s final val/AP and
their ratio, and the wall times (fine-tuning with and without the pre-training); writes
benchmarks/results/transfer_demo.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ray  # noqa: E402
import ray.train  # noqa: E402

from detr_ray import checkpoint as ckpt  # noqa: E402
from detr_ray.config import experiment_from_dict  # noqa: E402
from detr_ray.data import demo  # noqa: E402
from detr_ray.local_ray import init as init_local_ray  # noqa: E402
from detr_ray.model import build_model, load_pretrained  # noqa: E402
from detr_ray.train.demo_pretrain import (  # noqa: E402  # noqa: E402
    DEFAULT_CATEGORIES,
    PRETRAIN_EPOCHS,
    ensure_demo_pretrained,
    pretrain_experiment,
)
from detr_ray.train.trainer import build_trainer, demo_experiment  # noqa: E402


class EpochLog(ray.train.UserCallback):
    """Appends rank 0's epoch, val/AP, val/AP50 and the time of each report to a JSON-lines file
    (runs on the Train controller, on this machine)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        line = {"epoch": m.get("epoch"), "val/AP": m.get("val/AP"), "val/AP50": m.get("val/AP50"), "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def train_run(exp: dict, name: str, storage: str) -> dict:
    log_path = os.path.join(storage, f"{name}.jsonl")
    start = time.time()
    build_trainer(experiment_from_dict(exp), name=name, storage_path=storage, callbacks=[EpochLog(log_path)]).fit()
    wall = time.time() - start
    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    curve = [
        {
            "epoch": r["epoch"],
            "val_AP": r["val/AP"],
            "val_AP50": r["val/AP50"],
            "elapsed_s": round(r["time"] - start, 1),
        }
        for r in rows
    ]
    return {"wall_s": round(wall, 1), "curve": curve}


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((row for row in curve if row["val_AP"] is not None and row["val_AP"] >= target), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8, help="epochs of the from-scratch and the fine-tuning run")
    p.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "transfer_demo.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    exp = demo_experiment()
    exp["train"].update(epochs=args.epochs, tensorboard=False)
    demo.ensure_demo_shards()  # the demo data, generated once, outside the timings
    init_local_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="transfer-demo-")
    try:
        start = time.time()
        checkpoint = ensure_demo_pretrained(
            os.path.join(work, "pretrained"), experiment=pretrain_experiment(args.pretrain_epochs)
        )
        pretrain_s = round(time.time() - start, 1)
        pre_state = ckpt.load(checkpoint).state
        # What the fine-tuning run's loop logs when it loads the checkpoint, computed here for the record.
        names = [(c["id"], c["name"]) for c in demo.CATEGORIES]
        model = build_model(replace(experiment_from_dict(exp).model, num_classes=len(names)))
        report = load_pretrained(model, checkpoint, categories=names)

        scratch = train_run(exp, "scratch", work)
        finetune_exp = copy.deepcopy(exp)
        finetune_exp["train"]["pretrained"] = checkpoint
        finetune = train_run(finetune_exp, "finetune", work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    target = scratch["curve"][-1]["val_AP"]
    s_hit, f_hit = first_reaching(scratch["curve"], target), first_reaching(finetune["curve"], target)
    ratio = round(f_hit["epoch"] / s_hit["epoch"], 3) if f_hit else None
    summary = {
        "target_val_AP": target,
        "scratch_epochs_to_target": s_hit["epoch"],
        "finetune_epochs_to_target": f_hit["epoch"] if f_hit else None,
        "epoch_ratio": ratio,
        "scratch_wall_s_to_target": s_hit["elapsed_s"],
        "finetune_wall_s_to_target": f_hit["elapsed_s"] if f_hit else None,
        "finetune_wall_s_to_target_incl_pretraining": round(f_hit["elapsed_s"] + pretrain_s, 1) if f_hit else None,
        "finetune_final_val_AP": finetune["curve"][-1]["val_AP"],
    }

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    print(f"\n{'epoch':>5s} {'scratch val/AP':>15s} {'fine-tune val/AP':>17s}")
    for s, f in zip(scratch["curve"], finetune["curve"]):
        print(f"{s['epoch']:5d} {fmt(s['val_AP']):>15s} {fmt(f['val_AP']):>17s}")
    print(
        f"pre-training ({args.pretrain_epochs} epochs, categories {pre_state.categories['names']}): "
        f"{pretrain_s:.0f} s, "
        f"val/AP on its categories {pre_state.metrics.get('val/AP', float('nan')):.4f}"
    )
    print(f"load report: {report.summary()}")
    print(f"target (scratch final val/AP): {target:.4f}")
    print(
        f"epochs to reach it: scratch {s_hit['epoch']}, "
        f"fine-tune {summary['finetune_epochs_to_target'] or 'not reached'}; "
        f"ratio {ratio if ratio is not None else '-'}"
    )
    print(
        f"wall to reach it: scratch {s_hit['elapsed_s']:.0f} s, fine-tune "
        + (
            f"{f_hit['elapsed_s']:.0f} s "
            f"({summary['finetune_wall_s_to_target_incl_pretraining']:.0f} s with pre-training)"
            if f_hit
            else "-"
        )
        + f"; whole runs: scratch {scratch['wall_s']:.0f} s, fine-tune {finetune['wall_s']:.0f} s, "
        f"pre-training {pretrain_s:.0f} s"
    )

    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    record = {
        "machine": {
            "cpus": os.cpu_count(),
            "ray_num_cpus": args.num_cpus,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "command": shlex.join(["python", "benchmarks/transfer_demo.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "experiment": exp,
        "pretraining": {
            "categories": pre_state.categories,
            "epochs": args.pretrain_epochs,
            "default_categories": list(DEFAULT_CATEGORIES),
            "wall_s": pretrain_s,
            "val_AP_on_its_categories": pre_state.metrics.get("val/AP"),
            "load_report": report.summary(),
            "backbone_tensors_loaded": sum(k.startswith("backbone.") for k in report.loaded),
            "mapped_by_id": [m.name for m in report.mapped_by_id],
            "new_classes": [m.name for m in report.new_classes],
        },
        "scratch": scratch,
        "finetune": finetune,
        **summary,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
