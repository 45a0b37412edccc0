"""`python scripts/evaluate.py ARGS` runs `detr-ray evaluate ARGS`: the code and its --help are in
detr_ray/cli/evaluate.py."""

import sys

from detr_ray.cli.evaluate import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
