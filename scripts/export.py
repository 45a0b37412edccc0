"""`python scripts/export.py ARGS` runs `detr-ray export ARGS`: the code and its --help are in
detr_ray/cli/export.py."""

import sys

from detr_ray.cli.export import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
