"""Two fixes for Ray Data 2.60's scheduling on small machines, installed by detr_ray.data.pipeline.

1. Prompt resource limits at the start of every execution. What happens without it: a
streaming execution learns the resources it may use from Ray Data's autoscaling coordinator (an
actor), without blocking: the first query only sends the request and returns an empty
reservation, and `ResourceManager` asks again only after `GLOBAL_LIMITS_UPDATE_INTERVAL_S` (1 s). For that first second every operator's budget is zero,
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
still waits the full timeout, so an idle loop costs no more than before.

Both must be installed in the process that runs the execution: the driver for a plain dataset
iteration, Ray Train's SplitCoordinator actor for `get_dataset_shard`. pipeline.py installs them
when it is imported in a process that has Ray Data loaded; the coordinator imports pipeline.py
when it unpickles the dataset (decode_blocks lives there), so it is covered too.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

PROMPT_WINDOW_S = 5.0
_INSTALLED_FLAG = "_detr_ray_prompt_limits"


def install() -> bool:
    """Installs both fixes (once per process). Returns whether both are in place; a Ray whose
    internals differ from the expected ones is left alone."""
    return _install_prompt_limits() & _install_prompt_completion()


class _PromptWait:
    """Stands in for the `ray` module inside streaming_executor_state: everything is Ray's,
    except that `wait(..., num_returns=len(refs))` returns once any ref is ready."""

    def __init__(self, ray_module):
        self._ray = ray_module

    def __getattr__(self, name):
        return getattr(self._ray, name)

    def wait(self, refs, *, num_returns=1, timeout=None, fetch_local=True, **kwargs):
        if num_returns <= 1 or len(refs) <= 1:
            return self._ray.wait(refs, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local, **kwargs)
        self._ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=fetch_local, **kwargs)
        return self._ray.wait(refs, num_returns=num_returns, timeout=0, fetch_local=fetch_local, **kwargs)


def _install_prompt_completion() -> bool:
    try:
        from ray.data._internal.execution import streaming_executor_state as state
    except ImportError:
        return False
    if isinstance(getattr(state, "ray", None), _PromptWait):
        return True
    if not hasattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S") or not hasattr(getattr(state, "ray", None), "wait"):
        logger.debug("Ray Data's streaming_executor_state has changed; prompt task completion not installed")
        return False
    state.ray = _PromptWait(state.ray)
    return True


def _install_prompt_limits() -> bool:
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # another Ray layout: nothing to fix here
        return False
    if getattr(ResourceManager, _INSTALLED_FLAG, False):
        return True
    original = getattr(ResourceManager, "get_global_limits", None)
    if original is None or not hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"):
        logger.debug("Ray Data's ResourceManager has changed; prompt resource limits not installed")
        return False

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
