#!/usr/bin/env python
"""`python scripts/prepare_coco.py ARGS` runs `detr-ray prepare ARGS`: the code and its --help are in
detr_ray/cli/prepare_coco.py."""

import sys

from detr_ray.cli.prepare_coco import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
