"""A patch of Ray Data 2.60's internals that makes its scheduling prompt on small machines: two
fixes, installed when a dataset is built (datasets.py) and when decode.py is imported.

1. Prompt resource limits at the start of every execution. What happens without it: a
streaming execution learns the resources it may use from Ray Data's autoscaling coordinator (an
actor), without blocking: the first query only sends the request and returns an empty
reservation, and `ResourceManager` asks again only after `GLOBAL_LIMITS_UPDATE_INTERVAL_S` (1 s).
For that first second every operator's budget is zero,
so only the one task that Ray Data always lets an idle pipeline run is started. Each epoch and
each validation pass is a new execution, so each started with a second of one-task decoding.
Measured on 2 CPUs (640 COCO-sized images, a 3 s epoch): the first decoded block reached the
consumer after 0.9-1.5 s, the second decode task started ~1 s into the epoch.

The fix: while an execution's limits are still empty, in its first `PROMPT_WINDOW_S` seconds,
the next scheduling step asks again instead of waiting a second (the query never blocks; it reads
the answer of the request sent before). The reservation arrives within a few scheduling steps
(~40 ms here). After that, or when the window has passed, Ray's own cadence applies.

2. Prompt task completion. Each scheduling step waits for finished tasks with
`ray.wait(all active tasks, num_returns=len(all), timeout=0.1)`: it returns early only when every
active task is ready, so a task that finishes while another still runs is noticed at the 0.1 s
timeout, and its CPU handed to the next task one or two steps later. Measured (2 CPUs, 0.3 s
tasks): a worker idled 0.1-0.3 s between tasks, against ~0.02 s with the fix; with decode tasks
of ~0.4 s that was a fifth of the decoding time. The fix: the module's `ray.wait` returns as soon
as one of them is ready (then collects all that are ready without waiting); with nothing ready it
still waits the full timeout, so an idle loop costs no more than before. A wait without a
timeout is passed to Ray unchanged: it returns `num_returns` ready refs, as `ray.wait` promises.

Both must be installed in the process that runs the execution: the driver for a plain dataset
iteration; for `get_dataset_shard`, Ray Train's SplitCoordinator actor, or the Train worker itself
in a run of one worker (trainer.data_config). decode.py installs them when it is imported in a
process that has Ray Data loaded; either process imports decode.py when it unpickles the dataset
(decode_blocks lives there), so both are covered.

Both rely on Ray Data internals (checked for Ray 2.60). A Ray whose internals differ is left
alone, with a WARNING naming the Ray version and the fix that did not apply; the pipeline still
works, at Ray's own pace. `DETR_RAY_DATA_SCHEDULING_PATCH=0` turns both off (to measure them, or
to rule them out; the older name `DETR_RAY_DATA_FIXES=0` works too); set it where Ray's workers see
it too (their environment or the job's runtime_env env_vars), since the Train coordinator (or
worker) installs them in its own process.
"""

from __future__ import annotations

import logging
import os
import sys
import time

logger = logging.getLogger(__name__)

PROMPT_WINDOW_S = 5.0
ENV_SWITCH = "DETR_RAY_DATA_SCHEDULING_PATCH"  # "0", "false", "off" or "no": install nothing
OLD_ENV_SWITCH = "DETR_RAY_DATA_FIXES"  # the same switch under its former name, still honoured
_INSTALLED_FLAG = "_detr_ray_prompt_limits"
_warned: set[str] = set()


def enabled() -> bool:
    """False when ENV_SWITCH (or, when that is unset, OLD_ENV_SWITCH) says off."""
    value = os.environ.get(ENV_SWITCH, os.environ.get(OLD_ENV_SWITCH, "1"))
    return value.strip().lower() not in ("0", "false", "off", "no")


def install() -> bool:
    """Installs both fixes (once per process). Returns whether both are in place: False when
    turned off by DETR_RAY_DATA_SCHEDULING_PATCH=0, or when Ray's internals differ from the
    expected ones (then Ray is left alone and a WARNING says which fix did not apply)."""
    if not enabled():
        return False
    return _install_prompt_limits() & _install_prompt_completion()


def installed() -> dict[str, bool]:
    """Which fixes are in place in this process (without installing anything)."""
    state = sys.modules.get("ray.data._internal.execution.streaming_executor_state")
    manager = sys.modules.get("ray.data._internal.execution.resource_manager")
    return {
        "prompt resource limits": bool(getattr(getattr(manager, "ResourceManager", None), _INSTALLED_FLAG, False)),
        "prompt task completion": isinstance(getattr(state, "ray", None), _PromptWait),
    }


def _cannot_install(fix: str, why: str) -> bool:
    if fix not in _warned:  # install() runs for every dataset: one warning per process
        _warned.add(fix)
        import ray

        logger.warning(
            "detr_ray.data.ray_data_scheduling_patch: %s not installed on Ray %s (%s); Ray Data runs at its own pace "
            "(written for Ray 2.60; %s=0 silences this)",
            fix,
            ray.__version__,
            why,
            ENV_SWITCH,
        )
    return False


class _PromptWait:
    """Stands in for the `ray` module inside streaming_executor_state: everything is Ray's,
    except that `wait(..., num_returns=k, timeout=t)` returns once any ref is ready (before t, as
    a wait with a timeout may). Without a timeout it is Ray's wait: k refs, however long."""

    def __init__(self, ray_module):
        self._ray = ray_module

    def __getattr__(self, name):
        return getattr(self._ray, name)

    def wait(self, refs, *, num_returns=1, timeout=None, fetch_local=True, **kwargs):
        if num_returns <= 1 or len(refs) <= 1 or timeout is None:
            return self._ray.wait(refs, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local, **kwargs)
        self._ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=fetch_local, **kwargs)
        return self._ray.wait(refs, num_returns=num_returns, timeout=0, fetch_local=fetch_local, **kwargs)


def _install_prompt_completion() -> bool:
    fix = "prompt task completion"
    try:
        from ray.data._internal.execution import streaming_executor_state as state
    except ImportError as e:
        return _cannot_install(fix, f"no streaming_executor_state: {e}")
    if isinstance(getattr(state, "ray", None), _PromptWait):
        return True
    if not hasattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S") or not hasattr(getattr(state, "ray", None), "wait"):
        return _cannot_install(fix, "streaming_executor_state has no WAIT_FOR_TASK_COMPLETION_TIMEOUT_S or ray.wait")
    state.ray = _PromptWait(state.ray)
    return True


def _install_prompt_limits() -> bool:
    fix = "prompt resource limits"
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError as e:
        return _cannot_install(fix, f"no ResourceManager: {e}")
    if getattr(ResourceManager, _INSTALLED_FLAG, False):
        return True
    original = getattr(ResourceManager, "get_global_limits", None)
    init_names = getattr(getattr(ResourceManager.__init__, "__code__", None), "co_names", ())
    if (
        original is None
        or not hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S")
        or "_global_limits_last_update_time" not in init_names  # what the fix resets
    ):
        return _cannot_install(
            fix,
            "ResourceManager has no get_global_limits, GLOBAL_LIMITS_UPDATE_INTERVAL_S "
            "or _global_limits_last_update_time",
        )

    def get_global_limits(self):
        limits = original(self)
        first = self.__dict__.setdefault("_detr_ray_first_limits_query", time.monotonic())
        empty = limits.cpu == 0 and limits.gpu == 0 and limits.object_store_memory == 0
        if empty and time.monotonic() - first < PROMPT_WINDOW_S and hasattr(self, "_global_limits_last_update_time"):
            self._global_limits_last_update_time = 0.0  # ask again at the next scheduling step
        return limits

    ResourceManager.get_global_limits = get_global_limits
    setattr(ResourceManager, _INSTALLED_FLAG, True)
    return True
