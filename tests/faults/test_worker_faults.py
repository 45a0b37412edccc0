"""Train-level faults on one local Ray: a worker SIGKILLed mid-epoch (slow: DETR_RAY_SLOW=1 or
benchmarks/faults.py; in CI tests/train/test_trainer.py kills a worker mid-run through its testing
hook), the newest checkpoint truncated (in CI, about a minute on 2 cores)."""

import pytest
import ray

from detr_ray.local_ray import init as init_local_ray
from tests.faults.conftest import assert_survived
from tests.faults.scenarios import truncated_checkpoint, worker_sigkill

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # 4 logical CPUs on 2 cores: 2 Train workers plus Ray Data's decode tasks.
    init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def truncated(tmp_path_factory, fault_demo_root, local_ray):
    return truncated_checkpoint(tmp_path_factory.mktemp("truncated"), fault_demo_root)


@pytest.mark.slow
def test_worker_sigkilled_mid_epoch_resumes_from_its_checkpoint(tmp_path, fault_demo_root):
    assert_survived(worker_sigkill(tmp_path, fault_demo_root))


def test_truncated_newest_checkpoint_is_skipped_and_redone(truncated):
    assert_survived({**truncated, "problems": [p for p in truncated["problems"] if "registry" not in p]})


def test_redone_epoch_does_not_share_a_registered_checkpoint_directory(truncated):
    assert not [p for p in truncated["problems"] if "registry" in p], truncated["problems"]
    # The redone epoch 2 has a name of its own, so evicting the corrupt one cannot delete it.
    assert truncated["checkpoints_after_relaunch"][-1] == "checkpoint_epoch0002-2", truncated[
        "checkpoints_after_relaunch"
    ]
