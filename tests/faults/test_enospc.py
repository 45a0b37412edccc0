"""A full filesystem under the checkpoint writer: a real tmpfs (root only, else skipped) as the
Train workers' TMPDIR, where checkpoint.save writes, filled once epoch 1's checkpoint is stored.
Slow (DETR_RAY_SLOW=1; benchmarks/faults.py runs it): two Train runs and a Ray of their own. In
CI, tests/test_checkpoint.py checks the writer itself on a full tmpfs.

The scenario runs in a Python process of its own, with a Ray started there for it: the fault
depends on the workers' TMPDIR and on the timing of one run, which the state that earlier test
modules leave in the pytest process must not decide."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import assert_survived

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys
from pathlib import Path
import ray
from detr_ray.local_ray import init as init_local_ray
from tests.faults.scenarios import enospc, tiny_tmpfs

workdir, demo_root = Path(sys.argv[1]), sys.argv[2]
# One tiny checkpoint (resnet18 + AdamW) is about 135 MB while it is written.
with tiny_tmpfs(workdir / "tmpfs", size_mb=384) as mounted:
    if mounted is None:
        record = None
    else:
        init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False,
                       runtime_env={"env_vars": {"TMPDIR": str(mounted)}})
        try:
            record = enospc(workdir / "run", demo_root, mounted)
        finally:
            ray.shutdown()
(workdir / "record.json").write_text(json.dumps(record, default=str))
"""


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, fault_demo_root):
    workdir = tmp_path_factory.mktemp("enospc")
    (workdir / "run").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(workdir), str(fault_demo_root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((workdir / "record.json").read_text())
    if record is None:
        pytest.skip("mounting a tmpfs needs root")
    return record


def test_disk_full_while_checkpointing_leaves_no_bad_checkpoint_and_resumes(disk_full):
    assert_survived(
        {**disk_full, "problems": [p for p in disk_full["problems"] if "does not say the disk is full" not in p]}
    )


def test_disk_full_error_says_so(disk_full):
    assert disk_full["clear_error"], disk_full["problems"]
