"""`python scripts/pretrain_demo.py ARGS` runs `detr-ray pretrain-demo ARGS`: the code and its --help are in
detr_ray/cli/pretrain_demo.py."""

import sys

from detr_ray.cli.pretrain_demo import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
