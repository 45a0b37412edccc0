"""A full filesystem under the checkpoint writer: a real tmpfs (root only, else skipped) as the
Train workers' TMPDIR, where checkpoint.save writes, filled once epoch 1's checkpoint is stored."""

import pytest
import ray

from detr_ray.local_ray import init as init_local_ray
from tests.faults.conftest import assert_survived
from tests.faults.scenarios import enospc, tiny_tmpfs

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    # One tiny checkpoint (resnet18 + AdamW) is about 135 MB while it is written.
    with tiny_tmpfs(tmp_path_factory.mktemp("tmpfs"), size_mb=384) as mounted:
        if mounted is None:
            pytest.skip("mounting a tmpfs needs root")
        init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False,
                       runtime_env={"env_vars": {"TMPDIR": str(mounted)}})
        yield mounted
        ray.shutdown()


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, fault_demo_root, full_dir):
    return enospc(tmp_path_factory.mktemp("enospc"), fault_demo_root, full_dir)


def test_disk_full_while_checkpointing_leaves_no_bad_checkpoint_and_resumes(disk_full):
    assert_survived({**disk_full, "problems": [p for p in disk_full["problems"] if "does not say the disk is full" not in p]})


def test_disk_full_error_says_so(disk_full):
    assert disk_full["clear_error"], disk_full["problems"]
