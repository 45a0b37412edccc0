"""A fix for Ray Data 2.60's start of every execution, installed by detr_ray.data.pipeline.

What happens without it: a streaming execution learns the resources it may use from Ray Data's
autoscaling coordinator (an actor), without blocking: the first query only sends the request and
returns an empty reservation, and `ResourceManager` asks again only after
`GLOBAL_LIMITS_UPDATE_INTERVAL_S` (1 s). For that first second every operator's budget is zero,
so only the one task that Ray Data always lets an idle pipeline run is started. Each epoch and
each validation pass is a new execution, so each started with a second of one-task decoding.
Measured on 2 CPUs (640 COCO-sized images, a 3 s epoch): the first decoded block reached the
consumer after 0.9-1.5 s, the second decode task started ~1 s into the epoch.

The fix: while an execution's limits are still empty, in its first `PROMPT_WINDOW_S` seconds,
the next scheduling step asks again instead of waiting a second (the query never blocks; it reads
the answer of the request sent before). The reservation arrives within a few scheduling steps
(~40 ms here). After that, or when the window has passed, Ray's own cadence applies.

It must be installed in the process that runs the execution: the driver for a plain dataset
iteration, Ray Train's SplitCoordinator actor for `get_dataset_shard`. pipeline.py installs it
when it is imported in a process that has Ray Data loaded; the coordinator imports pipeline.py
when it unpickles the dataset (decode_augment lives there), so it is covered too.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

PROMPT_WINDOW_S = 5.0
_INSTALLED_FLAG = "_detr_ray_prompt_limits"


def install() -> bool:
    """Patches ResourceManager.get_global_limits (once per process). Returns whether the patch
    is in place; a Ray whose ResourceManager lacks the expected attributes is left alone."""
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
