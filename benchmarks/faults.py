"""The fault suite with figures: every fault of tests/faults/ injected for real, N times each,
against a clean run of the same work (modelled on Ray's release chaos tests and Tune's
driver-kill restore test).

    python benchmarks/faults.py [--repeat 1] [--only worker_sigkill,enospc,...] [--note "..."]

Faults: a Train worker SIGKILLed mid-epoch; a worker node of a local multi-node cluster killed
mid-sweep; ENOSPC (a full tmpfs) under the checkpoint writer; the newest checkpoint truncated;
the sweep's driver (scripts/tune.py) SIGKILLed after its first trial started, mid-training and
after a trial finished, then the same command run again. Each is checked for: exactly
num_samples distinct trials, no completed epoch lost or trained twice, the best checkpoint
verifies, reports continue from the checkpoint (tests/faults/scenarios.py).

Prints a table (fault, times injected, survived, epochs lost, wall time against a clean run; Tune's
bar: a restored sweep takes at most 2.5x a clean one) and writes benchmarks/results/faults.json.
The ENOSPC fault needs root (it mounts a tmpfs); without root it is reported as not injected.
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
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from tests.faults import scenarios as sc  # noqa: E402

# Least covered elsewhere first (tests/train and tests/scripts already kill workers and drivers),
# so that a run cut short still has their figures.
FAULTS = [
    "enospc",
    "node_loss",
    "driver_kill:trials_finished",
    "driver_kill:trial_started",
    "worker_sigkill",
    "truncated_checkpoint",
    "driver_kill:mid_training",
]


def _guard(fault: str, run) -> dict:
    """A scenario that raises did not survive: recorded, and the benchmark carries on."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001
        return sc.record(fault, False, 0.0, [f"raised {type(e).__name__}: {e}", traceback.format_exc()[-1500:]], 0)


def _local_ray(**kwargs):
    from detr_ray.local_ray import init

    return init(num_cpus=4, include_dashboard=False, log_to_driver=False, **kwargs)


def run_group(fault: str, repeat: int, demo, scratch: Path) -> tuple[dict, list[dict]]:
    """The clean run and `repeat` faulted runs of `fault`."""
    import ray

    def workdir(tag):
        d = scratch / f"{fault.replace(':', '-')}-{tag}"
        d.mkdir(parents=True)
        return d

    if fault in ("worker_sigkill", "truncated_checkpoint"):
        fn = sc.worker_sigkill if fault == "worker_sigkill" else sc.truncated_checkpoint
        _local_ray()
        try:
            clean = _guard(fault, lambda: fn(workdir("clean"), demo, inject=False))
            runs = [_guard(fault, lambda i=i: fn(workdir(i), demo)) for i in range(repeat)]
        finally:
            ray.shutdown()
        return clean, runs
    if fault == "enospc":
        with sc.tiny_tmpfs(scratch / "tmpfs", size_mb=384) as full:
            if full is None:
                miss = sc.record(
                    "ENOSPC in the checkpoint writer", False, 0.0, ["not injected: mounting a tmpfs needs root"], 0
                )
                return miss, [miss] * repeat
            _local_ray(runtime_env={"env_vars": {"TMPDIR": str(full)}})
            try:
                clean = _guard(fault, lambda: sc.enospc(workdir("clean"), demo, full, inject=False))
                runs = [_guard(fault, lambda i=i: sc.enospc(workdir(i), demo, full)) for i in range(repeat)]
            finally:
                ray.shutdown()
        return clean, runs
    if fault == "node_loss":

        def once(tag, inject):
            with sc.two_node_cluster() as cluster:
                return sc.node_loss(workdir(tag), demo, cluster, inject=inject)

        clean = _guard(fault, lambda: once("clean", False))
        return clean, [_guard(fault, lambda i=i: once(i, True)) for i in range(repeat)]
    if fault.startswith("driver_kill:"):
        point = fault.split(":", 1)[1]
        return None, [_guard(fault, lambda i=i: sc.driver_kill(workdir(i), demo, point)) for i in range(repeat)]
    raise SystemExit(f"unknown fault {fault!r}; choose from {FAULTS}")


def table(rows: list[dict]) -> str:
    header = [
        "fault",
        "injected",
        "survived",
        "epochs lost",
        "clean s",
        "faulted s",
        "extra s",
        "x clean",
        f"<= {sc.TUNE_BAR}x",
    ]
    lines = [header]
    for r in rows:
        ratio = r["wall_ratio"]
        lines.append(
            [
                r["fault"],
                f"{r['injected']}/{r['runs']}",
                f"{r['survived']}/{r['runs']}",
                str(r["epochs_lost"]),
                f"{r['clean_wall_s']:.0f}" if r["clean_wall_s"] else "-",
                f"{r['faulted_wall_s']:.0f}",
                f"{r['extra_wall_s']:+.0f}" if r["extra_wall_s"] is not None else "-",
                f"{ratio:.2f}" if ratio is not None else "-",
                "-" if ratio is None else ("yes" if ratio <= sc.TUNE_BAR else "NO"),
            ]
        )
    widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write(args, argv, rows: list[dict], records: dict, started: float) -> None:
    import ray
    import torch

    result = {
        "benchmark": "faults",
        "command": "python benchmarks/faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
        },
        "note": args.note,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_wall_s": round(time.time() - started, 1),
        "bar": f"a restored run takes at most {sc.TUNE_BAR}x a clean one (Tune's own bar)",
        "rows": rows,
        "records": records,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1, help="injections per fault (default 1)")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(FAULTS))
    p.add_argument("--note", default="", help="recorded with the figures (e.g. that the machine was shared)")
    p.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (runs, sweeps, logs) for a post-mortem"
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "faults.json"))
    args = p.parse_args(argv)
    faults = args.only.split(",") if args.only else FAULTS

    from detr_ray.data.demo import ensure_demo_shards

    scratch = Path(tempfile.mkdtemp(prefix="detr-ray-faults-"))
    demo = scratch / "demo"
    ensure_demo_shards(demo, num_train=32, num_val=16)
    rows, records = [], {}
    clean_sweep = None
    started = time.time()
    try:
        for fault in faults:
            clean, runs = run_group(fault, args.repeat, demo, scratch)
            if fault.startswith("driver_kill:"):  # one clean sweep is the baseline of every kill point
                if clean_sweep is None:
                    (scratch / "clean-sweep").mkdir()
                    clean_sweep = _guard("clean sweep", lambda: sc.driver_kill(scratch / "clean-sweep", demo, None))
                clean = clean_sweep
            faulted = sum(r["wall_s"] for r in runs) / len(runs)
            clean_wall = clean["wall_s"] if clean and not clean["problems"] else None
            ratio = faulted / clean_wall if clean_wall else None
            row = {
                "fault": runs[0]["fault"],
                "runs": len(runs),
                "injected": sum(r["injected"] for r in runs),
                "survived": sum(r["survived"] for r in runs),
                "epochs_lost": sum(r["epochs_lost"] for r in runs),
                "clean_wall_s": clean_wall,
                "faulted_wall_s": round(faulted, 1),
                "extra_wall_s": round(faulted - clean_wall, 1) if clean_wall else None,
                "wall_ratio": round(ratio, 2) if ratio else None,
            }
            rows.append(row)
            records[fault] = {"clean": clean, "runs": runs}
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            write(args, argv, rows, records, started)  # after every fault: a cut-short run keeps its figures
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)  # only the scratch directory this run created

    print()
    print(table(rows))
    for fault, rec in records.items():
        for r in rec["runs"]:
            for problem in r["problems"]:
                print(f"  {fault}: {problem.splitlines()[0][:300]}")
    print(f"\nwrote {args.out}")
    return 0 if all(r["survived"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
