"""How long `make test` takes here, next to how fast this machine is while it runs.

The suite's time is mostly Ray starting processes that import torch, so it follows the
machine's speed of the moment (benchmarks/results/README.md, "Test suite"). A fixed reference
workload, timed before and after the suite, tells a slow suite from a slow machine: the same
imports and the same single-thread ResNet-18 steps.

  python benchmarks/test_suite.py                        # make test, then the record
  python benchmarks/test_suite.py --reference-only       # the reference workload alone
  python benchmarks/test_suite.py --command "make test-fast"

Prints the figures and writes benchmarks/results/test_suite_<commit>.json; an existing record
is never replaced (the run is refused before it starts: pass another --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_STEPS = """
import time, torch, torchvision
torch.set_num_threads(1)
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(8, 3, 96, 96), torch.randint(0, 10, (8,))
for _ in range(3):  # warm-up
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
t = time.perf_counter()
for _ in range(20):
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
print(time.perf_counter() - t)
"""


def _cpu_s() -> tuple[float, float]:
    """CPU-seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal), and
    the steal among them: time this virtual machine's CPUs were ready to run but the hypervisor ran
    something else (other machines on the same host). Busy keeps steal, as the earlier records do;
    steal on its own tells a crowded host from a suite that grew."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def reference() -> dict:
    """The fixed workload: `import torch, torchvision` in a new interpreter (best of 3, wall
    seconds) and 20 single-thread ResNet-18 training steps on 8 images of 96x96 (seconds), with
    the share of the CPUs' time stolen by the host meanwhile."""
    (_, steal0), wall0 = _cpu_s(), time.perf_counter()
    imports = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, torchvision"], check=True)
        imports.append(time.perf_counter() - start)
    steps = float(subprocess.run([sys.executable, "-c", _STEPS], check=True, capture_output=True, text=True).stdout)
    steal_share = (_cpu_s()[1] - steal0) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
    return {
        "import_torch_torchvision_s": round(min(imports), 2),
        "resnet18_20_steps_1_thread_s": round(steps, 2),
        "steal_share": round(steal_share, 3),
    }


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _summary(log: str) -> dict:
    """pytest's closing line and its slowest tests, read from the run's output."""
    found = re.findall(r"^=* ?(\d+ (?:passed|failed|error)[^\n]*?) in ([\d.]+)s", log, re.M)
    counts, seconds = found[-1] if found else ("", None)
    slowest = [
        {"seconds": float(s), "phase": phase, "test": test}
        for s, phase, test in re.findall(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)", log, re.M)
    ]
    return {"pytest_result": counts, "pytest_s": seconds and float(seconds), "slowest": slowest[:20]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", default="make test", help="what to time (default: make test)")
    parser.add_argument("--reference-only", action="store_true", help="time the reference workload and stop")
    parser.add_argument("--out", type=Path, help="record file (default: benchmarks/results/test_suite_<commit>.json)")
    args = parser.parse_args(argv)

    commit = _commit()
    out = args.out or RESULTS / f"test_suite_{commit}.json"
    if out.exists() and not args.reference_only:
        parser.error(f"{out} already holds a record; pass another --out")
    before = reference()
    print(f"reference workload: {before}")
    if args.reference_only:
        return 0

    started = datetime.now(timezone.utc)
    (busy0, steal0), wall0 = _cpu_s(), time.perf_counter()
    env = {**os.environ, "PYTEST_ADDOPTS": (os.environ.get("PYTEST_ADDOPTS", "") + " --durations=20").strip()}
    proc = subprocess.Popen(
        shlex.split(args.command), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    rc = proc.wait()
    wall, (busy, steal) = time.perf_counter() - wall0, _cpu_s()
    busy, steal = busy - busy0, steal - steal0
    after = reference()

    record = {
        "benchmark": "test_suite",
        "command": f"python benchmarks/test_suite.py --command {shlex.quote(args.command)}",
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date_utc": started.strftime("%Y-%m-%d %H:%M"),
        "exit_code": rc,
        "wall_s": round(wall, 1),
        "machine_busy_cpu_s": round(busy, 1),
        "machine_steal_cpu_s": round(steal, 1),
        **_summary("".join(lines)),
        "reference_before": before,
        "reference_after": after,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"\n{args.command}: exit {rc}, {wall / 60:.1f} min wall (pytest: {record['pytest_result'] or 'no summary'}), "
        f"machine busy {busy:.0f} CPU-s, of which steal {steal:.0f} "
        f"({steal / (wall * (os.cpu_count() or 1)):.0%} of the CPUs' time); "
        f"reference before {before}, after {after}\nrecord: {out}"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
