"""ray_data_fixes: an execution uses its CPUs from its start (not after Ray Data's first
one-second refresh of its resource limits), and a finished task's CPU goes to the next task at
once (not at the scheduling loop's 0.1 s timeout)."""

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
    time.sleep(TASK_S if batch["id"][0] % 2 == 0 else TASK_S / 2)  # uneven: tasks end at different times
    return {"pid": [os.getpid()] * len(batch["id"]), "start": [start], "end": [time.time()]}


def _run_tasks(n: int = 6):
    """(start times in s after the execution began, idle gaps between consecutive tasks of one
    worker process) of a fresh n-task execution."""
    ds = ray.data.range(n, override_num_blocks=n).map_batches(_timed_task, batch_size=None, num_cpus=1)
    began = time.time()
    tasks = ds.to_pandas().sort_values("start")
    gaps = [
        later - earlier
        for _, worker in tasks.groupby("pid")
        for earlier, later in zip(worker["end"].tolist()[:-1], worker["start"].tolist()[1:])
    ]
    return sorted(s - began for s in tasks["start"]), gaps


@pytest.mark.timeout(180)
def test_an_execution_runs_tasks_on_every_cpu_from_its_start(ray_two_cpus):
    assert ray_data_fixes.install() and ray_data_fixes.install()  # idempotent
    _run_tasks()  # warm-up: worker processes and imports
    starts, gaps = _run_tasks()
    # Without the fix Ray Data's budget is zero until the first refresh (1 s), so tasks run one
    # at a time (starts ~TASK_S apart); with it, two start together on the two CPUs.
    assert len(starts) == 6
    assert starts[1] - starts[0] < TASK_S / 2, starts
    assert starts[-1] < 3 * TASK_S, starts  # 6 tasks of 0.3 or 0.15 s on 2 CPUs


@pytest.mark.timeout(180)
def test_a_finished_tasks_cpu_goes_to_the_next_task_at_once(ray_two_cpus):
    assert ray_data_fixes.install()
    _, gaps = _run_tasks(10)
    # Without the fix, a task ending while the other still runs is seen at the 0.1 s timeout
    # and the next one starts a step or two later (0.1-0.3 s); with it, in a few ms.
    assert len(gaps) == 8
    assert sorted(gaps)[len(gaps) // 2] < 0.06, gaps
