"""The command-line programs: `detr-ray <command>` (detr_ray/cli/main.py) and scripts/<name>.py run
the same `main(argv)` of the module here named for the command."""

from __future__ import annotations

import sys


def invocation() -> list[str]:
    """The words that started this command, for the commands it prints to run again:
    `detr-ray train` (the dispatcher puts that in sys.argv[0]) or `python scripts/train.py`."""
    first = sys.argv[0]
    return first.split() if first.startswith("detr-ray ") else ["python", first]
