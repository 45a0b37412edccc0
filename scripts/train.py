"""`python scripts/train.py ARGS` runs `detr-ray train ARGS`: the code and its --help are in detr_ray/cli/train.py."""

import sys

from detr_ray.cli.train import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
