"""`python scripts/serve.py ARGS` runs `detr-ray serve ARGS`: the code and its --help are in detr_ray/cli/serve.py."""

import sys

from detr_ray.cli.serve import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
