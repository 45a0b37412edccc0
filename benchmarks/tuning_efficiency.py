"""Does Optuna (TPE) + ASHA find as good a configuration as random search without early
stopping, for less compute? Both sweeps run on the demo task with the same search space and
number of trials, one after the other on the same local Ray.

    python benchmarks/tuning_efficiency.py [--space search_spaces/demo.yaml] [--num-samples 8]

Prints, per strategy, the best val/AP (and its val/AP50), the trial-epochs spent (compute) and
the wall time; writes benchmarks/results/tuning_efficiency.json. Target: Optuna + ASHA reaches at
least random search's best val/AP with at most half its trial-epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detr_ray.data.datasets import resolve_shards  # noqa: E402
from detr_ray.local_ray import init as init_local_ray  # noqa: E402
from detr_ray.tune.space import load_space  # noqa: E402
from detr_ray.tune.summary import best_row_value, summarize  # noqa: E402
from detr_ray.tune.tuner import build_sweep  # noqa: E402

STRATEGIES = {"optuna+asha": ("optuna", True), "random, no early stopping": ("random", False)}


def run(space, label: str, storage: str, shards: tuple[str, str]) -> dict:
    search, early = STRATEGIES[label]
    sweep = build_sweep(
        space,
        name=search + ("-asha" if early else "-fifo"),
        storage_path=storage,
        resume=False,
        search=search,
        early_stopping=early,
        shards=shards,
    )
    start = time.time()
    rows, best = summarize(sweep.fit(), space)
    wall = time.time() - start
    ap50 = None
    if best is not None:
        ap50 = best_row_value(best, "val/AP", "val/AP50")
    return {
        "strategy": label,
        "trials": len(rows),
        "best_val_AP": best["best"] if best else None,
        "best_val_AP50": ap50,
        "best_config": best["config"] if best else None,
        "trial_epochs": sum(r["epochs"] for r in rows),
        "stopped_early": sum(r["status"] == "stopped early (ASHA)" for r in rows),
        "wall_s": round(wall, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default=os.path.join(REPO, "search_spaces", "demo.yaml"))
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "tuning_efficiency.json"))
    args = p.parse_args()

    import ray

    space = load_space(args.space)
    space.scheduler.num_samples = args.num_samples
    shards = resolve_shards(space.fixed.data)  # the demo data generated once, before the sweeps
    init_local_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="tuning-efficiency-")
    try:
        results = [run(space, label, storage, shards) for label in STRATEGIES]
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    a, b = results
    verdict = {
        "reaches_random_best": a["best_val_AP"] is not None
        and b["best_val_AP"] is not None
        and a["best_val_AP"] >= b["best_val_AP"],
        "compute_ratio": round(a["trial_epochs"] / b["trial_epochs"], 3) if b["trial_epochs"] else None,
    }
    verdict["target_met"] = (
        verdict["reaches_random_best"] and verdict["compute_ratio"] is not None and verdict["compute_ratio"] <= 0.5
    )
    print(
        f"{'strategy':28s} {'best val/AP':>11s} {'val/AP50':>9s} {'trial-epochs':>12s} {'stopped':>8s} {'wall s':>7s}"
    )
    for r in results:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"{r['strategy']:28s} {fmt(r['best_val_AP']):>11s} {fmt(r['best_val_AP50']):>9s} {r['trial_epochs']:12d} "
            f"{r['stopped_early']:8d} {r['wall_s']:7.0f}"
        )
    print(
        f"compute ratio (a/b): {verdict['compute_ratio']}, reaches (b)'s best: {verdict['reaches_random_best']}, "
        f"target met: {verdict['target_met']}"
    )
    record = {
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "platform": platform.platform()},
        "space": os.path.relpath(args.space, REPO),
        "num_samples": args.num_samples,
        "results": results,
        **verdict,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
