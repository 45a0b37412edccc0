"""Does a warm start help? On the demo task: a cheap source sweep (fewer epochs, a wider lr
range), then the target sweep twice with the same seed, cold and warm-started from the source's
Optuna study, comparing the best val/AP each reaches after the same number of trials.

    python benchmarks/warm_start.py [--num-samples 4] [--source-samples 6] [--epochs 4] [--steps 15] [--seeds 0]

Each sweep is capped (--steps optimizer steps per epoch) to fit a 2-core machine. Writes
benchmarks/results/warm_start.json (machine, command, date, per sweep: best val/AP, every trial,
what the warm start used and ignored) and, with --report, evaluates the warm sweep with
scripts/evaluate.py and copies its sweep figures to benchmarks/results/warm_start_report/.
One seed pair is one draw of a noisy process: read it as an anecdote, not an effect size.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detr_ray.data.datasets import resolve_shards  # noqa: E402
from detr_ray.local_ray import init as init_local_ray  # noqa: E402
from detr_ray.tune.space import load_space  # noqa: E402
from detr_ray.tune.summary import summarize, write_summary  # noqa: E402
from detr_ray.tune.tuner import build_sweep  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")


def run(space, name: str, storage: str, data: dict, **kwargs) -> dict:
    start = time.time()
    sweep = build_sweep(
        space, name=name, storage_path=storage, resume=False, shards=(data["train"], data["val"]), **kwargs
    )
    rows, best = summarize(sweep.fit(), space)
    write_summary(sweep, rows, best, data)
    by_order = rows  # Tune's results come in the order it created the trials
    return {
        "sweep": name,
        "trials": len(rows),
        "best_val_AP": best["best"] if best else None,
        "best_so_far": _running_best([r["best"] for r in by_order]),
        "trial_epochs": sum(r["epochs"] for r in rows),
        "rows": [
            {
                "trial": r["trial"],
                "config": r["config"],
                "best_val_AP": r["best"],
                "epochs": r["epochs"],
                "status": r["status"],
            }
            for r in by_order
        ],
        "warm_start": sweep.warm.describe() if sweep.warm is not None else None,
        "wall_s": round(time.time() - start, 1),
        "dir": sweep.experiment_dir,
    }


def with_train(space, **train):
    """`space` with these fixed train settings."""
    experiment = {**space.experiment, "train": {**space.experiment.get("train", {}), **train}}
    return dataclasses.replace(space, experiment=experiment, fixed=None)  # parsed again


def _running_best(values: list) -> list:
    out, best = [], None
    for v in values:
        if isinstance(v, (int, float)):
            best = v if best is None else max(best, v)
        out.append(best)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default=os.path.join(REPO, "search_spaces", "demo.yaml"))
    p.add_argument("--num-samples", type=int, default=4, help="trials of each target sweep (N)")
    p.add_argument("--source-samples", type=int, default=6, help="trials of the source sweep")
    p.add_argument("--epochs", type=int, default=4, help="epochs of a target trial (the source runs half)")
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per epoch (the demo has 50)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one cold/warm pair per seed")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--report", action="store_true", help="evaluate the (first) warm sweep and keep its sweep figures")
    p.add_argument("--out", default=os.path.join(RESULTS, "warm_start.json"))
    args = p.parse_args()

    import ray

    target = load_space(args.space)
    train_uri, val_uri = resolve_shards(target.fixed.data)  # the demo data generated once, before the sweeps
    data = {"train": train_uri, "val": val_uri}
    target = with_train(target, epochs=args.epochs, max_steps_per_epoch=args.steps)
    target.scheduler.num_samples = args.num_samples
    target.scheduler.startup_trials = 2  # the cold sweep's TPE starts after 2 trials; the warm one's at once

    source = with_train(
        copy.deepcopy(target), epochs=max(1, args.epochs // 2)
    )  # cheaper, and wider in lr: some of its trials fall outside the target
    source.scheduler.num_samples = args.source_samples
    source.scheduler.seed = 100
    for param in source.params:
        if param.key == "train.lr":
            param.args = [param.args[0] / 2, param.args[1] * 2]

    init_local_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="warm-start-")
    started = time.time()
    try:
        src = run(source, "source", storage, data)
        pairs = []
        for seed in args.seeds:
            target.scheduler.seed = seed
            cold = run(target, f"cold-{seed}", storage, data)
            warm = run(target, f"warm-{seed}", storage, data, warm_start=src["dir"])
            pairs.append(
                {
                    "seed": seed,
                    "cold": cold,
                    "warm": warm,
                    "warm_minus_cold_best_val_AP": (warm["best_val_AP"] or 0) - (cold["best_val_AP"] or 0),
                }
            )
            print(
                f"seed {seed}: best val/AP after {args.num_samples} trials: cold {cold['best_val_AP']:.4f}, "
                f"warm {warm['best_val_AP']:.4f} (warm start used {len(warm['warm_start']['used'])} of the source's "
                f"{src['trials']} trials, ignored {len(warm['warm_start']['ignored'])})",
                flush=True,
            )
        ray.shutdown()
        if args.report:
            report_dir = os.path.join(storage, "report")
            subprocess.run(
                [
                    sys.executable,
                    os.path.join(REPO, "scripts", "evaluate.py"),
                    "--experiment",
                    pairs[0]["warm"]["dir"],
                    "--out",
                    report_dir,
                    "--no-progress",
                    "--num-cpus",
                    str(args.num_cpus),
                ],
                check=True,
                env={**os.environ, "PYTHONPATH": REPO},
            )
            keep = os.path.join(RESULTS, "warm_start_report")
            os.makedirs(keep, exist_ok=True)
            for name in sorted(os.listdir(os.path.join(report_dir, "figures"))):
                if name.startswith("sweep_"):
                    shutil.copy(os.path.join(report_dir, "figures", name), keep)
            with open(os.path.join(report_dir, "report.json")) as f:
                sweep_json = json.load(f)["sweep"]
            with open(os.path.join(keep, "sweep.json"), "w") as f:
                json.dump({k: v for k, v in sweep_json.items() if k != "search"}, f, indent=1)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    for pair in pairs:
        for key in ("cold", "warm"):
            pair[key].pop("dir")
    src.pop("dir")
    wins = sum(p["warm_minus_cold_best_val_AP"] > 0 for p in pairs)
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "ray_num_cpus": args.num_cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "command": "python benchmarks/warm_start.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": {
            "space": os.path.relpath(args.space, REPO),
            "target_epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "target_trials": args.num_samples,
            "source_trials": args.source_samples,
            "source_epochs": source.experiment["train"]["epochs"],
            "source_lr_range": next(p.args for p in source.params if p.key == "train.lr"),
        },
        "source": src,
        "pairs": pairs,
        "summary": f"warm start ahead in {wins} of {len(pairs)} seed pair(s)",
        "caveat": "each pair is one draw: TPE's proposals, data order and ASHA's stops all vary with the seed, "
        "and a few capped epochs on the demo give val/AP differences of the size of that noise; "
        + (
            "a single pair is an anecdote, not evidence either way."
            if len(pairs) == 1
            else "see the spread over pairs."
        ),
        "wall_s": round(time.time() - started, 1),
    }
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"{payload['summary']}; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
