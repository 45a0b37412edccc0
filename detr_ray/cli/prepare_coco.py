#!/usr/bin/env python
"""Convert one split of a COCO-format dataset into Parquet shards (+ _meta.json).

    python scripts/prepare_coco.py --images /data/coco/val2017 \\
        --annotations /data/coco/annotations/instances_val2017.json --out s3://bucket/coco/val
    python scripts/prepare_coco.py --demo --out data/demo      # synthetic demo: DIR/train, DIR/val
    python scripts/prepare_coco.py --demo --num-train 32 --num-val 8 --out /tmp/tiny   # a smaller one

Run it once per split. A rerun over a finished output reuses what is there. --out must be new,
empty or an earlier output of the same conversion: other files there are an error, never replaced.
"""

from __future__ import annotations

import argparse
import logging
import sys

from detr_ray.data.coco import CocoFormatError, load_coco
from detr_ray.data.demo import make_demo_dataset
from detr_ray.data.images import DEFAULT_MAX_PIXELS
from detr_ray.data.shards import ReadRetry, ShardError, read_meta, write_shards
from detr_ray.ownership import NotOwnedError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="directory (or URI) holding the split's image files")
    p.add_argument("--annotations", help="COCO instances JSON of the split")
    p.add_argument("--out", required=True, help="output directory or pyarrow URI (s3://, gs://)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per Parquet file (default 1000)")
    p.add_argument(
        "--strict", action="store_true", help="missing, undecodable, too large or mis-sized images are errors"
    )
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per core)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images whose header declares more pixels (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--read-attempts",
        type=int,
        default=ReadRetry.attempts,
        help=f"reads of an image file before an I/O error fails its shard (default {ReadRetry.attempts}, "
        f"waiting {ReadRetry.first_delay} s, then twice as long after each failure)",
    )
    p.add_argument("--demo", action="store_true", help="generate the synthetic demo dataset into --out")
    p.add_argument("--num-train", type=int, help="with --demo: training images (default 400)")
    p.add_argument("--num-val", type=int, help="with --demo: validation images (default 100)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.demo and (args.images or args.annotations):
        p.error("--demo generates its own images and annotations; drop --images/--annotations")
    if not args.demo and not (args.images and args.annotations):
        p.error("give --images and --annotations (or --demo)")
    for flag, value in (("--num-train", args.num_train), ("--num-val", args.num_val)):
        if value is not None and not args.demo:
            p.error(f"{flag} sizes the --demo dataset; a COCO split converts all of its images")
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.demo:
            sizes = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val)) if v is not None}
            train, val = make_demo_dataset(args.out, workers=args.workers or 0, progress=not args.no_progress, **sizes)
            for split, uri in (("train", train), ("val", val)):
                meta = read_meta(uri)
                print(f"{split}: {uri}  ({meta.counts['images']} images, {meta.counts['annotations']} objects)")
            return 0
        dataset = load_coco(args.annotations)
        report = write_shards(
            dataset,
            args.images,
            args.out,
            shard_size=args.shard_size,
            strict=args.strict,
            workers=args.workers,
            progress=not args.no_progress,
            max_pixels=args.max_pixels,
            read_retry=ReadRetry(attempts=args.read_attempts),
        )
    except (CocoFormatError, ShardError, NotOwnedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
