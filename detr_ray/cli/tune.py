"""Tune DETR's hyperparameters: Ray Tune runs Optuna (TPE) proposals, ASHA stops poor trials.

  python scripts/tune.py                      # the demo sweep on the demo data, local Ray
  python scripts/tune.py --space search_spaces/coco_r50_r101.yaml --data s3://bucket/coco-shards \
      --storage s3://bucket/sweeps --name coco-r50-r101 --workers-per-trial 4 --gpus-per-trial 4

--data is a directory or URI holding train/ and val/ shard directories (default: the demo data,
generated if missing). The sweep lives in <storage>/<name>; running the same command again (or
with --resume) restores it: unfinished trials continue from their checkpoints, finished ones are
kept. A restore runs the sweep as it was started (recorded in <storage>/<name>/detr_ray_sweep.json):
a command whose search space, scheduler or fixed experiment (--set, --data, --num-samples, ...)
differs from that is refused (exit code 2, listing each differing key, stored -> requested); pass
--resume-as-stored to restore it with the stored configuration anyway, or choose a new --name.
On a cluster set RAY_ADDRESS (ray job submit does) or pass --address.

The sweep's Optuna study (every trial's parameters, per-epoch values and state) is kept in
<storage>/<name>/optuna.journal, or in --study-storage (an RDB URL such as
postgresql://user@db-host/optuna, or a journal file path; required when --storage is s3:// or
gs://); `optuna-dashboard <that storage>` shows it while the sweep runs and after.
--warm-start <earlier sweep directory, journal file or RDB URL> gives a new sweep's TPE the
results of that study's trials that lie inside this search space (the others are listed, with why).

Trust: restoring unpickles Tune's state from <storage>/<name> in this process, so whoever can
write there can run code here. Use storage that only you (on a cluster: the head) can write;
README "Running on a cluster" (IAM) gives the policy that keeps worker nodes out of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from detr_ray.config import ConfigError, apply_overrides, bundled_search_space, load_yaml
from detr_ray.data.datasets import resolve_shards
from detr_ray.data.storage import join
from detr_ray.tune import console, study
from detr_ray.tune.resources import SweepError
from detr_ray.tune.space import parse_space
from detr_ray.tune.summary import best_row_value, summarize, write_summary
from detr_ray.tune.tuner import build_sweep

DEFAULT_SPACE = str(bundled_search_space("demo.yaml"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default=DEFAULT_SPACE, help="search-space YAML (default: search_spaces/demo.yaml)")
    p.add_argument("--data", help="directory or URI with train/ and val/ shard directories; default: demo data")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the YAML's scheduler.num_samples)")
    p.add_argument(
        "--storage",
        default=os.environ.get("DETR_RAY_STORAGE", "runs"),
        help="local directory or s3://, gs:// URI; "
        "a restore unpickles the sweep's state from it, so it must be writable only by those trusted "
        "to run code here",
    )
    p.add_argument("--name", help="experiment name (default: the space file's name); stable, so rerunning resumes")
    p.add_argument("--resume", action="store_true", help="require an existing sweep to resume (error if none)")
    p.add_argument(
        "--resume-as-stored",
        action="store_true",
        help="restore the sweep with its stored search space, scheduler and experiment, ignoring this command's",
    )
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, split over its workers (fractions allowed)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved by each Train worker")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds now)")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial may be stopped")
    p.add_argument("--reduction-factor", type=int, help="ASHA: keep 1/factor of the trials at each rung")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a fixed experiment value"
    )
    p.add_argument(
        "--study-storage",
        help="Optuna storage of the sweep's study: an RDB URL (postgresql://..., "
        "sqlite:////abs/path.db) or a journal file; default: <storage>/<name>/optuna.journal",
    )
    p.add_argument(
        "--warm-start",
        metavar="SWEEP_OR_STORAGE",
        help="seed TPE with the results of an earlier sweep's "
        "study (its directory, a journal file or an RDB URL) whose parameters lie inside this space",
    )
    p.add_argument(
        "--warm-start-study", metavar="NAME", help="the study to warm-start from, when the storage holds several"
    )
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    return p.parse_args(argv)


def load(args):
    """The validated search space with the command line applied (nothing of Ray started)."""
    raw = load_yaml(args.space)
    exp = {k: dict(v or {}) for k, v in (raw.get("experiment") or {}).items()}
    if args.data:
        exp.setdefault("data", {}).update(train=join(args.data, "train"), val=join(args.data, "val"))
    train = exp.setdefault("train", {})
    if args.workers_per_trial is not None:
        train["num_workers"] = args.workers_per_trial
    if args.gpus_per_trial is not None:
        train["gpus_per_worker"] = args.gpus_per_trial / train.get("num_workers", 1)
    if args.cpus_per_worker is not None:
        train["cpus_per_worker"] = args.cpus_per_worker
    raw["experiment"] = apply_overrides(exp, args.set)
    scheduler = dict(raw.get("scheduler") or {})
    for key in ("num_samples", "grace_period", "reduction_factor"):
        if getattr(args, key) is not None:
            scheduler[key] = getattr(args, key)
    raw["scheduler"] = scheduler
    return parse_space(raw, args.space)  # every sampled configuration is checked with the overrides applied


def print_summary(rows: list[dict], metric: str) -> None:
    keys = sorted({k for r in rows for k in r["config"]})
    header = ["trial", *keys, f"best {metric}", "epochs", "stopped"]
    table = [header]
    for r in sorted(rows, key=lambda r: -(r["best"] if r["best"] is not None else -1)):
        cells = [r["trial"]]
        for k in keys:
            v = r["config"].get(k)
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        cells += ["-" if r["best"] is None else f"{r['best']:.4f}", str(r["epochs"]), r["status"]]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.name or os.path.splitext(os.path.basename(args.space))[0]
    try:
        space = load(args)
        # Once for every trial: the demo data is generated now, before any trial starts.
        shards = resolve_shards(space.fixed.data)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    _start_ray(args)
    start = time.time()
    try:
        sweep = build_sweep(
            space,
            name=name,
            storage_path=args.storage,
            resume=True,
            max_concurrent=args.max_concurrent,
            as_stored=args.resume_as_stored,
            study_storage=args.study_storage,
            warm_start=args.warm_start,
            warm_start_study=args.warm_start_study,
            shards=shards,
        )
        if args.resume and not sweep.restored:
            print(f"error: --resume but there is no sweep at {sweep.experiment_dir}", file=sys.stderr)
            return 2
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if sweep.space.fixed.data != space.fixed.data:  # restored as stored, with data of its own
        shards = resolve_shards(sweep.space.fixed.data)
    _print_start(sweep)
    results = sweep.fit()
    rows, best = summarize(results, sweep.space)
    written = write_summary(sweep, rows, best, {"train": shards[0], "val": shards[1]})
    print(f"\nsweep finished in {time.time() - start:.0f} s ({len(rows)} trials)\n")
    return _print_end(sweep, rows, best, written)


def _start_ray(args) -> None:
    import ray

    if args.address:
        context = ray.init(address=args.address, **console.ray_init_kwargs())
    else:
        from detr_ray import local_ray

        context = local_ray.init(num_cpus=args.num_cpus, **console.ray_init_kwargs())
    url = context.dashboard_url
    print(f"Ray dashboard: http://{url}" if url else "Ray dashboard: not running (install ray[default])", flush=True)
    print(f"Ray's logs (the trials' Train workers, Ray Data): {console.log_locations(context)}", flush=True)


def _print_start(sweep) -> None:
    space = sweep.space
    print(
        f"{'resuming' if sweep.restored else 'starting'} sweep {sweep.experiment_dir}: "
        f"{space.scheduler.num_samples} trials, "
        f"up to {sweep.concurrency} at once\nTensorBoard: tensorboard --logdir {sweep.experiment_dir}",
        flush=True,
    )
    if sweep.study_storage:
        print(
            f"Optuna study {sweep.study_name!r}: {study.dashboard_command(sweep.study_storage)}  (http://127.0.0.1:8080)",
            flush=True,
        )
    if sweep.warm is not None:
        warm = sweep.warm
        print(
            f"warm start from {warm.source} (study {warm.study}): {len(warm.used)} trials used, {len(warm.ignored)} "
            "ignored"
        )
        for number, why in warm.ignored:
            print(f"  ignored trial {number}: {why}")


def _print_end(sweep, rows: list[dict], best: dict | None, written: dict) -> int:
    """The trials' table, where the summary files are and what to run next; the exit status."""
    space = sweep.space
    print_summary(rows, space.scheduler.metric)
    leaks = (
        json.loads(open(written["trials"]).read())["leaked_placement_groups"] if "://" not in written["trials"] else []
    )
    if leaks:
        print(f"\nWARNING: Ray left {len(leaks)} finished trials' placement groups behind; they were removed: {leaks}")
    print(f"\ntrials: {written['trials']}")
    if space.scheduler.objectives:
        front = json.loads(open(written["best"]).read()) if "best" in written and "://" not in written["best"] else []
        if "best" not in written:
            print("no trial ran all its epochs with a verified checkpoint: no Pareto front", file=sys.stderr)
            return 1
        print(
            f"Pareto front of {', '.join(f'{m} ({d})' for m, d in study.objectives(space).items())}: "
            f"{len(front) or 'see'} trial(s)\nbest: {written['best']}"
        )
        for member in front:
            print(f"  {member['trial']}: " + ", ".join(f"{k} {v:.4g}" for k, v in member["values"].items()))
        print(
            f'evaluate one: python scripts/evaluate.py --experiment {sweep.experiment_dir} --choose "max '
            f'{space.scheduler.metric}"'
        )
        return 0
    if best is None:
        print("no trial produced a verified checkpoint", file=sys.stderr)
        return 1
    ap50 = best_row_value(best, space.scheduler.metric, "val/AP50")
    print(
        f"best trial {best['trial']}: {space.scheduler.metric} {best['best']:.4f}"
        + (f", val/AP50 {ap50:.4f}" if ap50 is not None else "")
        + f"\nbest: {written['best']}"
    )
    print(f"evaluate it: python scripts/evaluate.py --experiment {sweep.experiment_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
