"""Sweep-level faults (slow: DETR_RAY_SLOW=1; benchmarks/faults.py runs them all): the driver
(scripts/tune.py) SIGKILLed at three points and rerun, and a worker node of a local multi-node
cluster lost mid-sweep. (The CI share of driver kills is tests/scripts/test_tune_cli.py.)"""

import pytest

from tests.faults.conftest import assert_survived
from tests.faults.scenarios import KILL_POINTS, driver_kill, node_loss, two_node_cluster

pytestmark = pytest.mark.faults


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_driver_sigkilled_then_rerun_finishes_the_sweep(tmp_path, fault_demo_root, point):
    assert_survived(driver_kill(tmp_path, fault_demo_root, point))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_node_lost_mid_sweep(tmp_path, fault_demo_root):
    with two_node_cluster() as cluster:
        assert_survived(node_loss(tmp_path, fault_demo_root, cluster))
