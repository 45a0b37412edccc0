"""The embedded default dataset: deterministic synthetic shapes in COCO format, sharded through
the same path as real COCO (coco.load_coco -> shards.write_shards).

Designed to be learned by a tiny DETR in a minute or two of CPU:
- small images (64-96 px per side, varied aspect), 0-2 large objects (35-70% of the short side);
- three classes with a distinct colour each, in two supercategories:
  rectangle (red) and triangle (blue) are "polygon", ellipse (green) is "round";
- textured, noisy, low-saturation backgrounds; ~10% of images are empty;
- two objects may overlap (only if of different classes, so that same-coloured shapes never
  merge); each keeps >= 60% of its pixels visible, and its box is the bounding box of its visible
  pixels (so boxes always follow what can be seen).

Layout written by `make_demo_dataset(out_dir)`:
    out_dir/raw/train/*.jpg, out_dir/raw/val/*.jpg
    out_dir/raw/annotations/instances_{train,val}.json
    out_dir/train/, out_dir/val/             Parquet shards + _meta.json
    out_dir/.detr-ray-owner                  marks out_dir as the generator's (ownership.MARKER)

The generator writes only into a new or empty directory, or one it marked before; it deletes
only files it writes itself, in a directory it marked (see `ensure_demo_shards`).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from detr_ray.data.coco import load_coco
from detr_ray.data.shards import ShardError, read_meta, write_shards
from detr_ray.ownership import MARKER, claim, owner, remove_generated

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "polygon"},
    {"id": 2, "name": "triangle", "supercategory": "polygon"},
    {"id": 3, "name": "ellipse", "supercategory": "round"},
]
COLOURS = {1: (220, 45, 45), 2: (45, 85, 230), 3: (45, 200, 70)}  # one distinct colour per class
OBJECT_COUNT_PROBS = (0.1, 0.55, 0.35)  # P(0 objects), P(1), P(2)
MIN_VISIBLE = 0.6

OWNER = "detr_ray.data.demo"  # the name in the marker of a directory the generator made
LOCK_FILE = ".detr-ray-demo.lock"
# Every path (relative to the root, "/"-separated) the generator writes, directories included;
# `<file>.<8 hex>.tmp` are storage.write_bytes_atomic's files of an interrupted write.
_GENERATED = re.compile(
    r"(train|val)(/(part-\d{5}-of-\d{5}-[0-9a-f]{10}\.parquet|_meta\.json)(\.[0-9a-f]{8}\.tmp)?)?"
    r"|raw(/(train|val)(/(train|val)_\d{6,}\.jpg)?|/annotations(/instances_(train|val)\.json)?)?"
)


def default_demo_root() -> str:
    """$DETR_RAY_DEMO_DIR, else ~/.cache/detr_ray/demo-v<version>."""
    return os.environ.get("DETR_RAY_DEMO_DIR") or str(Path.home() / ".cache" / "detr_ray" / f"demo-v{DEMO_VERSION}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation texture: a smooth random field in a random tint, plus pixel noise."""
    coarse = rng.uniform(0, 1, size=(rng.integers(3, 7), rng.integers(3, 7)))
    field = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR), dtype=np.float32
    )
    base = rng.uniform(80, 160)
    tint = rng.uniform(-12, 12, size=3)
    image = base + (field[..., None] - 128) * 0.35 + tint
    stripes = rng.uniform(0, 10) * np.sin(np.arange(width) * rng.uniform(0.3, 1.2) + rng.uniform(0, 6))
    image = image + stripes[None, :, None] + rng.normal(0, 9, size=(height, width, 3))
    return image


def _shape_mask(rng: np.random.Generator, category_id: int, height: int, width: int) -> np.ndarray:
    """A boolean mask of one shape of the given class at a random place, size and aspect."""
    short = min(height, width)
    w = int(rng.uniform(0.35, 0.7) * short)
    h = int(np.clip(w * np.exp(rng.uniform(-0.5, 0.5)), 0.3 * short, 0.75 * short))
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + w - 1, y0 + h - 1
    if category_id == 1:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif category_id == 2:
        apex = x0 + rng.uniform(0.2, 0.8) * (x1 - x0)
        points = [(apex, y0), (x1, y1), (x0, y1)] if rng.uniform() < 0.5 else [(apex, y1), (x1, y0), (x0, y0)]
        draw.polygon(points, fill=255)
    else:
        draw.ellipse([x0, y0, x1, y1], fill=255)
    return np.asarray(canvas) > 0


def _render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (uint8 HWC) and its objects: category_id, bbox [x, y, w, h], area."""
    count = int(rng.choice(3, p=OBJECT_COUNT_PROBS))
    for _ in range(20):  # retry until every object keeps enough visible pixels
        categories = [int(c) for c in rng.choice([1, 2, 3], size=count)]
        masks = [_shape_mask(rng, c, height, width) for c in categories]
        visible = []
        for i, m in enumerate(masks):  # later shapes are drawn on top of earlier ones
            covered = np.zeros_like(m)
            for later in masks[i + 1 :]:
                covered |= later
            visible.append(m & ~covered)
        same_class_touching = count == 2 and categories[0] == categories[1] and (masks[0] & masks[1]).any()
        if not same_class_touching and all(v.sum() >= MIN_VISIBLE * m.sum() for v, m in zip(visible, masks)):
            break
    else:
        categories, masks, visible = categories[:1], masks[:1], masks[:1]

    image = _background(rng, height, width)
    for c, m in zip(categories, masks):
        colour = np.asarray(COLOURS[c], dtype=np.float32) + rng.uniform(-20, 20, size=3)
        image[m] = colour + rng.normal(0, 6, size=(int(m.sum()), 3))
    objects = []
    for c, v in zip(categories, visible):
        ys, xs = np.nonzero(v)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append({"category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(v.sum())})
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _write_split(out_dir: Path, split: str, count: int, seed: int, sizes: tuple[int, int]) -> Path:
    image_dir = out_dir / "raw" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        pixels, objects = _render(rng, height, width)
        image_id = i + 1
        file_name = f"{split}_{image_id:06d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        (image_dir / file_name).write_bytes(buffer.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    annotation_file = out_dir / "raw" / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    annotation_file.write_text(json.dumps(coco))
    return annotation_file


def _params(num_train: int, num_val: int, seed: int, image_sizes: tuple[int, int], shard_size: int) -> dict:
    """What the generated data depends on; stored in the shards' meta to detect stale data."""
    return {
        "version": DEMO_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "image_sizes": [int(s) for s in image_sizes],
        "shard_size": shard_size,
    }


def make_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    image_sizes: tuple[int, int] = (64, 96),
    shard_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> tuple[str, str]:
    """Generates the demo dataset under out_dir (see the module docstring) and shards it.
    Deterministic for given arguments. Returns (train_shards, val_shards) directories.
    out_dir must be new, empty or marked by the generator (else NotOwnedError, nothing written)."""
    out = claim(out_dir, OWNER, ignore=(LOCK_FILE,))
    params = _params(num_train, num_val, seed, image_sizes, shard_size)
    result = []
    for split, count in (("train", num_train), ("val", num_val)):
        annotation_file = _write_split(out, split, count, seed, image_sizes)
        shards = out / split
        report = write_shards(
            load_coco(str(annotation_file)),
            str(out / "raw" / split),
            str(shards),
            shard_size=shard_size,
            workers=workers,
            progress=progress,
            extra_meta={"demo": params},
        )
        logger.info("demo %s split:\n%s", split, report.summary())
        result.append(str(shards))
    return result[0], result[1]


def _demo_params(shards: Path) -> dict[str, Any] | None:
    try:
        return read_meta(str(shards)).extra.get("demo")
    except ShardError:
        return None


def _remove_generated(root: Path) -> None:
    """Deletes train/, val/ and raw/ under root, which the generator marked as its own, only if
    every file there is one the generator writes (ownership.remove_generated)."""
    remove_generated(
        root,
        ("train", "val", "raw"),
        _GENERATED,
        f"not written by the demo generator; refusing to regenerate the demo data in {root}, "
        "nothing was removed. Move it away, or point DETR_RAY_DEMO_DIR / data.demo_root at another directory.",
    )


def ensure_demo_shards(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    image_sizes: tuple[int, int] = (64, 96),
    shard_size: int = 64,
) -> tuple[str, str]:
    """(train_uri, val_uri) of the demo shards under `root` (default: default_demo_root()),
    generating them first if missing, incomplete or made by another generator version or other
    arguments. Safe to call from several processes of one machine at once (a file lock).

    Stale data is replaced only in a root the generator marked as its own (ownership.MARKER),
    and only if it holds nothing but the generator's files; demo shards of these arguments in an
    unmarked root are used as they are; any other content is a NotOwnedError naming the path."""
    root = Path(root or default_demo_root())
    root.mkdir(parents=True, exist_ok=True)
    wanted = _params(num_train, num_val, seed, image_sizes, shard_size)
    train, val = root / "train", root / "val"
    # Before taking the lock (which adds a file): a marker alone may be one being written under it.
    if owner(root) != OWNER and any(p.name not in (LOCK_FILE, MARKER) for p in root.iterdir()):
        if _demo_params(train) == wanted and _demo_params(val) == wanted:
            return str(train), str(val)
        claim(root, OWNER, ignore=(LOCK_FILE,))  # raises, naming root and what is in it
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        claim(root, OWNER, ignore=(LOCK_FILE,))
        if _demo_params(train) == wanted and _demo_params(val) == wanted:
            return str(train), str(val)
        _remove_generated(root)
        logger.info("generating the demo dataset under %s", root)
        return make_demo_dataset(
            root, num_train=num_train, num_val=num_val, seed=seed, image_sizes=image_sizes, shard_size=shard_size
        )
