"""`python scripts/tune.py ARGS` runs `detr-ray tune ARGS`: the code and its --help are in detr_ray/cli/tune.py."""

import sys

from detr_ray.cli.tune import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
