"""`python scripts/benchmark_detectors.py ARGS` runs `detr-ray benchmark-detectors ARGS`:
the code and its --help are in detr_ray/cli/benchmark_detectors.py."""

import sys

from detr_ray.cli.benchmark_detectors import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
