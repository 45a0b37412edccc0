#!/usr/bin/env python
"""How much of a batch is padding, with and without `data.group_shapes`, on DETR's COCO train
recipe: the real transforms give each image its size (COCO's three common source sizes, every
image its own random scale and crop), and the real `DetectionBatches` (shuffle buffer 64) forms
and pads the batches. Reports padding as a share of the batch pixels, pixels per image the model
computes on, and the CPU time per image of the pass (building the stand-in blocks, the same for
both, included); writes benchmarks/results/batch_padding.json.

    python benchmarks/batch_padding.py [--images 1600] [--batch-size 8]

No Ray: the blocks come from a list (what a Ray Data iterator yields: Arrow tables of decoded rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detr_ray.data.batches import DetectionBatches  # noqa: E402
from detr_ray.data.decode import DECODED_SCHEMA  # noqa: E402
from detr_ray.data.recipe import TransformConfig  # noqa: E402
from detr_ray.data.transforms import DetectionTransform  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "batch_padding.json"
SOURCE_SIZES = [(480, 640), (640, 480), (427, 640)]  # (h, w): COCO's most common


class Blocks:
    """Stands in for a Ray Data iterator: decoded rows in blocks of 16, pixels made on demand."""

    def __init__(self, sizes: list[tuple[int, int]], block_rows: int = 16):
        self.sizes, self.block_rows = sizes, block_rows

    def iter_batches(self, batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for k in range(0, len(self.sizes), self.block_rows):
            rows = [
                {
                    "image_id": k + i,
                    "image": bytes(h * w * 3),
                    "height": h,
                    "width": w,
                    "orig_height": h,
                    "orig_width": w,
                    "boxes": [0.5, 0.5, 0.2, 0.2],
                    "labels": [0],
                    "skipped": False,
                }
                for i, (h, w) in enumerate(self.sizes[k : k + self.block_rows])
            ]
            yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def augmented_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    torch.manual_seed(seed)
    transform = DetectionTransform(TransformConfig.coco(), train=True)
    sizes = []
    for i in range(count):
        h, w = SOURCE_SIZES[i % len(SOURCE_SIZES)]
        image, _, _ = transform(
            torch.zeros(3, h, w, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        )
        sizes.append(tuple(image.shape[-2:]))
    order = np.random.default_rng(seed).permutation(count)  # arrival order is random
    return [sizes[i] for i in order]


def measure(sizes, batch_size: int, group_shapes: bool) -> dict:
    batches = DetectionBatches(
        Blocks(sizes), batch_size=batch_size, shuffle_buffer=64, shuffle_seed=0, group_shapes=group_shapes
    )
    real = padded = 0
    start = time.process_time()
    for images, _, targets in batches:
        padded += images.shape[0] * images.shape[2] * images.shape[3]
        real += sum(int(t["size"][0]) * int(t["size"][1]) for t in targets)
    cpu = time.process_time() - start
    return {
        "group_shapes": group_shapes,
        "padding_share": round(1 - real / padded, 4),
        "pixels_per_image_incl_padding": round(padded / len(sizes)),
        "batching_cpu_ms_per_image": round(1000 * cpu / len(sizes), 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = augmented_sizes(args.images)
    rows = [measure(sizes, args.batch_size, g) for g in (False, True)]
    real_per_image = sum(h * w for h, w in sizes) / len(sizes)
    for r in rows:
        print(
            f"group_shapes={r['group_shapes']!s:5}: padding {100 * r['padding_share']:.1f}% of batch pixels, "
            f"{r['pixels_per_image_incl_padding'] / 1e6:.2f} Mpx per image (real {real_per_image / 1e6:.2f}), "
            f"batching {r['batching_cpu_ms_per_image']:.2f} CPU-ms/image"
        )
    result = {
        "recipe": "DETR COCO train (TransformConfig.coco()), sources " + ", ".join(f"{h}x{w}" for h, w in SOURCE_SIZES),
        "images": args.images,
        "batch_size": args.batch_size,
        "shuffle_buffer": 64,
        "real_pixels_per_image": round(real_per_image),
        "results": rows,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
