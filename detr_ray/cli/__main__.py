"""`python -m detr_ray.cli <command> ...` is `detr-ray <command> ...`."""

import sys

from detr_ray.cli.main import main

sys.exit(main())
