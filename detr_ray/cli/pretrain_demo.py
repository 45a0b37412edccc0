"""Pre-train the demo DETR on part of the demo's categories, for fine-tuning on all of them.

  python scripts/pretrain_demo.py                      # rectangle + triangle; prints the checkpoint
  python scripts/train.py --pretrained <that checkpoint>   # fine-tune on all three demo categories
  python scripts/pretrain_demo.py --categories rectangle,ellipse --epochs 4 --root /tmp/pre

The model is the demo experiment's (scripts/train.py's default), trained with Ray Train on demo
images of another seed whose objects all belong to the chosen categories; see
detr_ray/train/demo_pretrain.py. The checkpoint is cached under --root (default
$DETR_RAY_DEMO_PRETRAINED_DIR or ~/.cache/detr_ray/demo-pretrained-v1) and reused while the
recipe (categories, epochs, source images, --set values) is the same. Fine-tuning loads its class
head by category: the shared categories by id, the others freshly initialised (the run's log
lists them).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

from detr_ray.config import ConfigError, apply_overrides
from detr_ray.data import demo
from detr_ray.ownership import NotOwnedError
from detr_ray.train.demo_pretrain import (
    DEFAULT_CATEGORIES,
    PRETRAIN_EPOCHS,
    SOURCE,
    default_pretrained_root,
    ensure_demo_pretrained,
    pretrain_experiment,
)


def parse_categories(text: str) -> list[int]:
    """'rectangle,triangle' or '1,2' -> demo category ids; an unknown entry is a ConfigError."""
    by_name = {c["name"]: c["id"] for c in demo.CATEGORIES}
    ids = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item in by_name:
            ids.append(by_name[item])
        elif item.isdigit() and int(item) in by_name.values():
            ids.append(int(item))
        else:
            raise ConfigError(f"--categories: unknown demo category {item!r}; choose from {', '.join(by_name)}")
    return ids


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = {c["id"]: c["name"] for c in demo.CATEGORIES}
    p.add_argument(
        "--categories",
        default=",".join(names[c] for c in DEFAULT_CATEGORIES),
        help="demo categories to pre-train on, by name or id (default: %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=PRETRAIN_EPOCHS, help="pre-training epochs (default: %(default)s)")
    p.add_argument(
        "--num-train",
        type=int,
        default=SOURCE["num_train"],
        help="demo images generated for pre-training, before keeping those of the categories (default: %(default)s)",
    )
    p.add_argument(
        "--num-val", type=int, default=SOURCE["num_val"], help="the same for validation (default: %(default)s)"
    )
    p.add_argument("--root", default=default_pretrained_root(), help="cache directory (default: %(default)s)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a pre-training experiment value; fine-tune with the same model.* values",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all); RAY_ADDRESS joins a cluster")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        categories = parse_categories(args.categories)
        experiment = apply_overrides(pretrain_experiment(args.epochs), args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray

    from detr_ray.local_ray import init as init_local_ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        init_local_ray(num_cpus=args.num_cpus, include_dashboard=False)
    start = time.time()
    try:
        source = {"num_train": args.num_train, "num_val": args.num_val}
        path = ensure_demo_pretrained(args.root, categories=categories, experiment=experiment, source=source)
    except (ConfigError, ValueError, NotOwnedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"pre-trained demo model ({time.time() - start:.0f} s): {path}")
    print(
        "fine-tune it on all demo categories with:\n  "
        + shlex.join(["python", "scripts/train.py", "--pretrained", path])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
