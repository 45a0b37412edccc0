"""A local Ray keeps idle task workers for reuse even when every CPU is reserved (as in a sweep)."""

import os
import time

import pytest
import ray

from detr_ray.local_ray import init as init_local_ray

pytestmark = pytest.mark.timeout(180)


@ray.remote(num_cpus=0.25)
def _pid() -> int:
    return os.getpid()


@ray.remote(num_cpus=1.75)
class _Holder:  # reserves the rest of the CPUs, as a sweep's Train workers do
    def ready(self) -> bool:
        return True


def pids_of_spaced_tasks(count: int = 3, gap_s: float = 2.5) -> set[int]:
    holder = _Holder.remote()
    ray.get(holder.ready.remote())
    pids = set()
    for _ in range(count):
        pids.add(ray.get(_pid.remote()))
        time.sleep(gap_s)  # longer than Ray's idle-worker kill threshold (1 s)
    return pids


def test_idle_task_workers_are_reused_when_all_cpus_are_reserved():
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert len(pids_of_spaced_tasks()) == 1
    finally:
        ray.shutdown()
