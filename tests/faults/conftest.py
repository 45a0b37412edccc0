"""Fixtures of the fault suite (tests/faults/, scenarios in tests/faults/scenarios.py).

The slowest cases (whole sweeps killed and restored, a multi-node cluster losing a node, a run
on a disk that fills up, a worker SIGKILLed) are marked `slow` and run only with DETR_RAY_SLOW=1,
or through benchmarks/faults.py, which runs every fault and records the figures in
benchmarks/results/faults.json. CI keeps the truncated-checkpoint case, and cheaper tests of
the rest: the checkpoint writer on a full tmpfs, a worker killed mid-run, the sweep's driver
killed and restored (tests/test_checkpoint.py, tests/train/test_trainer.py, tests/scripts/test_tune_cli.py).
(tests/conftest.py skips the `slow` cases.)"""

from __future__ import annotations

import pytest

from detr_ray.data.demo import ensure_demo_shards


@pytest.fixture(scope="session")
def fault_demo_root(tmp_path_factory):
    """The demo dataset at its smallest that still gives every worker STEPS batches per epoch."""
    root = tmp_path_factory.mktemp("fault-demo")
    ensure_demo_shards(root, num_train=32, num_val=16)
    return root


def assert_survived(rec: dict) -> None:
    assert rec["injected"], rec
    assert not rec["problems"], "\n".join(rec["problems"])
    assert rec["epochs_lost"] == 0, rec
