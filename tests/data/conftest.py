"""Tiny COCO-format datasets on disk (solid rectangles on black JPEG/PNG images) and their shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from detr_ray.data.coco import load_coco
from detr_ray.data.recipe import TransformConfig
from detr_ray.data.shards import write_shards

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def rectangles_image(height: int, width: int, boxes: list[list[int]]) -> torch.Tensor:
    """uint8 [3,H,W] black image with box i ([x, y, w, h] pixels) filled with COLOURS[i]."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for i, (x, y, w, h) in enumerate(boxes):
        image[:, y : y + h, x : x + w] = torch.tensor(COLOURS[i], dtype=torch.uint8)[:, None, None]
    return image


def write_image(path: Path, image: torch.Tensor) -> None:
    data = encode_png(image) if path.suffix == ".png" else encode_jpeg(image, quality=95)
    path.write_bytes(data.numpy().tobytes())


def make_coco(root: Path, n_images: int = 6, size=(48, 64), categories=((7, "cat"), (3, "dog"))) -> dict:
    """Writes root/images/*.jpg and root/instances.json; image i has i % 3 rectangles
    (so some images are empty). Returns the COCO dict."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    height, width = size
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": cid, "name": name, "supercategory": "animal"} for cid, name in categories],
    }
    for i in range(n_images):
        boxes = [[4 + 20 * k, 6 + 3 * k, 12, 10 + 2 * k] for k in range(i % 3)]
        file_name = f"img_{i:03d}.png" if i == 1 else f"img_{i:03d}.jpg"
        write_image(images_dir / file_name, rectangles_image(height, width, boxes))
        coco["images"].append({"id": 100 + i, "file_name": file_name, "width": width, "height": height})
        for k, box in enumerate(boxes):
            coco["annotations"].append(
                {
                    "id": 1000 + len(coco["annotations"]),
                    "image_id": 100 + i,
                    "category_id": categories[k % len(categories)][0],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    (root / "instances.json").write_text(json.dumps(coco))
    return coco


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    make_coco(tmp_path)
    return tmp_path


AUGMENT = TransformConfig(
    train_scales=(40, 48, 56), max_size=100, crop_resize_scales=(48,), crop_min=32, crop_max=40, val_scale=48
)
AUGMENT_KW = {k: getattr(AUGMENT, k) for k in AUGMENT.__dataclass_fields__}
CORRUPT_ID = 103  # one object


def make_shards(root: Path, corrupt: bool = True) -> tuple[Path, dict]:
    """6 images 48x64 in 2 shards (ids 100..105; i % 3 rectangles each); one row's bytes
    replaced by garbage after validation, as a corrupt file would be."""
    coco = make_coco(root / "coco")
    out = root / "shards"
    write_shards(
        load_coco(str(root / "coco" / "instances.json")),
        str(root / "coco" / "images"),
        str(out),
        shard_size=3,
        workers=0,
        progress=False,
    )
    if corrupt:
        for path in sorted(out.glob("*.parquet")):
            table = pq.read_table(path)
            ids = table.column("image_id").to_pylist()
            if CORRUPT_ID in ids:
                images = table.column("image").to_pylist()
                images[ids.index(CORRUPT_ID)] = b"\xff\xd8garbage"
                table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
                pq.write_table(table, path)
    return out, coco
