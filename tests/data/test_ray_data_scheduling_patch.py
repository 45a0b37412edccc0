"""ray_data_scheduling_patch: an execution uses its CPUs from its start (not after Ray Data's first
one-second refresh of its resource limits), and a finished task's CPU goes to the next task at
once (not at the scheduling loop's 0.1 s timeout). ray.wait's contract holds; a Ray the fixes do
not fit gets a WARNING; DETR_RAY_DATA_SCHEDULING_PATCH=0 (or its former name,
DETR_RAY_DATA_FIXES=0) turns them off."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import ray
import ray.data

from detr_ray.data import ray_data_scheduling_patch
from detr_ray.local_ray import init as init_local_ray

TASK_S = 0.3
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file


@pytest.fixture(scope="module")
def ray_two_cpus():
    init_local_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _timed_task(batch, long_s: float, short_s: float):
    start = time.time()
    time.sleep(long_s if batch["id"][0] % 2 == 0 else short_s)  # uneven: tasks end at different times
    return {"pid": [os.getpid()] * len(batch["id"]), "start": [start], "end": [time.time()]}


def _run_tasks(n: int = 6, long_s: float = TASK_S, short_s: float = TASK_S / 2):
    """(start times in s after the execution began, idle gaps between consecutive tasks of one
    worker process) of a fresh n-task execution, tasks alternately long_s and short_s long."""
    ds = ray.data.range(n, override_num_blocks=n).map_batches(
        _timed_task, batch_size=None, num_cpus=1, fn_kwargs={"long_s": long_s, "short_s": short_s}
    )
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
    assert ray_data_scheduling_patch.install() and ray_data_scheduling_patch.install()  # idempotent
    _run_tasks()  # warm-up: worker processes and imports
    starts, gaps = _run_tasks()
    # Without the fix Ray Data's budget is zero until the first refresh (1 s), so tasks run one
    # at a time (starts ~TASK_S apart); with it, two start together on the two CPUs.
    assert len(starts) == 6
    assert starts[1] - starts[0] < TASK_S / 2, starts
    assert starts[-1] < 3 * TASK_S, starts  # 6 tasks of 0.3 or 0.15 s on 2 CPUs


@pytest.mark.timeout(180)
def test_a_finished_tasks_cpu_goes_to_the_next_task_at_once(ray_two_cpus, monkeypatch):
    from ray.data._internal.execution import streaming_executor_state as state

    assert ray_data_scheduling_patch.install()
    # Ray's loop waits for all active tasks, or its timeout: at Ray's 0.1 s the fix saves at most
    # 0.1 s per task, too close to a slow machine's scheduling noise to test. With a 2 s timeout
    # the difference is large: without the fix, a worker whose short task (0.1 s) ended beside a
    # long one (0.8 s) idles until the long one ends (0.7 s; measured: 2 or 3 gaps of 0.95-1.9 s
    # out of 8); with it, no gap is longer than a few scheduling steps (measured: at most 0.03 s).
    monkeypatch.setattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", 2.0)
    _, gaps = _run_tasks(10, long_s=0.8, short_s=0.1)
    assert len(gaps) == 8
    assert max(gaps) < 0.4, gaps


@ray.remote(num_cpus=0)
def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.mark.timeout(120)
def test_the_patched_wait_keeps_ray_waits_contract(ray_two_cpus):
    from ray.data._internal.execution import streaming_executor_state as state

    assert ray_data_scheduling_patch.install()
    patched = state.ray
    assert isinstance(patched, ray_data_scheduling_patch._PromptWait)
    ray.get([_sleep.remote(0) for _ in range(3)])  # warm workers: the durations below are the tasks'
    # No timeout: blocks until num_returns refs are ready, however staggered.
    refs = [_sleep.remote(s) for s in (1.2, 0.05, 0.6)]
    ready, not_ready = patched.wait(refs, num_returns=2, timeout=None)
    assert len(ready) == 2 and ray.get(ready) == [0.05, 0.6] and not_ready == [refs[0]]
    # With a timeout (Ray Data's scheduling loop): back as soon as one is ready.
    refs = [_sleep.remote(s) for s in (1.5, 0.05)]
    start = time.monotonic()
    ready, _ = patched.wait(refs, num_returns=2, timeout=1.0)
    assert ray.get(ready) == [0.05] and time.monotonic() - start < 0.9


def test_a_ray_the_fixes_do_not_fit_gets_a_warning_naming_its_version(monkeypatch, caplog):
    """Ray's real modules with the internals the fixes rely on taken away, as a newer Ray would."""
    from ray.data._internal.execution import streaming_executor_state as state
    from ray.data._internal.execution.resource_manager import ResourceManager

    monkeypatch.setattr(ray_data_scheduling_patch, "_warned", set(), raising=False)  # warned once per process
    monkeypatch.delattr(ResourceManager, ray_data_scheduling_patch._INSTALLED_FLAG, raising=False)
    monkeypatch.delattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S")
    monkeypatch.setattr(state, "ray", ray)
    monkeypatch.delattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S")
    original = ResourceManager.get_global_limits
    with caplog.at_level(logging.WARNING, logger=ray_data_scheduling_patch.__name__):
        assert not ray_data_scheduling_patch.install()
        assert not ray_data_scheduling_patch.install()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per fix, not one per dataset
    for fix, message in zip(("prompt resource limits", "prompt task completion"), warnings):
        assert fix in message and f"Ray {ray.__version__}" in message, message
    assert state.ray is ray and ResourceManager.get_global_limits is original  # Ray left alone


_PATCHED = """
import json, ray.data
import detr_ray.data.decode  # installs the fixes on import in a process with Ray Data loaded
from ray.data._internal.execution import streaming_executor_state as state
from ray.data._internal.execution.resource_manager import ResourceManager
print(json.dumps([type(state.ray).__name__, bool(getattr(ResourceManager, "_detr_ray_prompt_limits", False))]))
"""


@pytest.mark.timeout(120)
def test_the_environment_switch_installs_nothing():
    def patched(**env):
        out = subprocess.run(
            [sys.executable, "-c", _PATCHED],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=100,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert patched(DETR_RAY_DATA_SCHEDULING_PATCH="1") == ["_PromptWait", True]
    assert patched(DETR_RAY_DATA_SCHEDULING_PATCH="0") == ["module", False]
    assert patched(DETR_RAY_DATA_FIXES="0") == ["module", False]  # the former name
    assert patched(DETR_RAY_DATA_FIXES="0", DETR_RAY_DATA_SCHEDULING_PATCH="1") == [
        "_PromptWait",
        True,
    ]  # the new name wins
