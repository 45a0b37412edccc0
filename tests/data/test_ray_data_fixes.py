"""ray_data_fixes: an execution uses its CPUs from its start, not after Ray Data's first
one-second refresh of its resource limits."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
import ray.data

from detr_ray.data import ray_data_fixes
from detr_ray.local_ray import init as init_local_ray

TASK_S = 0.3
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file


@pytest.fixture(scope="module")
def ray_two_cpus():
    init_local_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _timed_task(batch):
    start = time.time()
    time.sleep(TASK_S)
    return {"pid": [os.getpid()] * len(batch["id"]), "start": [start] * len(batch["id"])}


def _task_starts() -> list[float]:
    """Start times (s after the execution began) of the tasks of a fresh 6-task execution."""
    ds = ray.data.range(6, override_num_blocks=6).map_batches(_timed_task, batch_size=None, num_cpus=1)
    began = time.time()
    return sorted(s - began for s in ds.to_pandas()["start"])


@pytest.mark.timeout(180)
def test_an_execution_runs_tasks_on_every_cpu_from_its_start(ray_two_cpus):
    assert ray_data_fixes.install() and ray_data_fixes.install()  # idempotent
    _task_starts()  # warm-up: worker processes and imports
    starts = _task_starts()
    # Without the fix Ray Data's budget is zero until the first refresh (1 s), so tasks run one
    # at a time (starts ~TASK_S apart); with it, two start together on the two CPUs.
    assert len(starts) == 6
    assert starts[1] - starts[0] < TASK_S / 2, starts
    assert starts[-1] < 3 * TASK_S + 0.5, starts  # 6 tasks on 2 CPUs: 3 rounds
