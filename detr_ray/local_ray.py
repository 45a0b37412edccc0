"""Starting a local Ray instance (a laptop, CI, the tests) that keeps its workers warm.

Ray keeps at most as many idle worker processes as there are *unreserved* CPUs (or
`num_workers_soft_limit`, when set) and kills the rest after a second of idleness. In a sweep
every CPU is reserved by the trials' Train workers, so each Ray Data read and decode task that
finished had its process killed, and the next task paid for a new one: a Python start plus the
torch and torchvision imports, about 3 CPU-seconds. Measured on 2 cores during the demo sweep:
8 to 16 new worker processes a minute. A fixed soft limit keeps a few idle workers for reuse.
"""

from __future__ import annotations

import os
from typing import Any


def system_config(num_cpus: int | None = None) -> dict[str, Any]:
    cpus = num_cpus or os.cpu_count() or 1
    return {"num_workers_soft_limit": max(8, 2 * int(cpus))}


def init(num_cpus: int | None = None, **kwargs):
    """ray.init for a new local instance, with `system_config` (cannot join an existing one)."""
    import ray

    return ray.init(num_cpus=num_cpus, _system_config=system_config(num_cpus), **kwargs)
