"""Decoded rows (decode.DECODED_SCHEMA) -> a padded batch, with one copy of each image's pixels.

Crowd annotations (iscrowd=1) are left out of the targets, as in DETR.

A batch (`collate`, and `DetectionBatches` in batches.py):
    images  uint8 [B, 3, H, W] in channels-last memory layout (strides of [B, H, W, 3], which is
            how the JPEG decoder and the resize produce pixels, so no transposing copy is made on
            the CPU; `normalize` on the training device picks the layout the model wants),
            zero-padded on the right and bottom to the batch's largest H, W
    mask    bool  [B, H, W], True on padding
    targets list of B dicts: boxes float32 [N, 4] normalized (cx, cy, w, h) relative to the
            unpadded augmented image; labels int64 [N] in 0..K-1; image_id int;
            orig_size int64 [2] (h, w) of the original image; size int64 [2] (h, w) augmented.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from detr_ray.data.decode import NO_PIXELS


class Row(NamedTuple):
    """One decoded image, its pixels still a view into the Arrow block that holds them."""

    image_id: int
    pixels: np.ndarray  # uint8 [h * w * 3], HWC, read-only view
    height: int
    width: int
    orig_height: int
    orig_width: int
    boxes: list
    labels: list


def _column(batch: Any, name: str) -> list:
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist()
    return list(batch[name])


def _pixel_views(batch: Any) -> list[np.ndarray]:
    """Read-only uint8 views of each row's raw pixels, without copying them."""
    if not isinstance(batch, pa.Table):
        return [np.frombuffer(b, dtype=np.uint8) for b in batch["image"]]
    views = []
    for chunk in batch.column("image").chunks:
        chunk = chunk.cast(pa.large_binary()) if chunk.type != pa.large_binary() else chunk
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else NO_PIXELS
        views += [data[offsets[i] : offsets[i + 1]] for i in range(len(chunk))]
    return views


def image_rows(batch: Any) -> tuple[list[Row], int]:
    """(the rows that hold an image, the number of skipped rows) of a DECODED_SCHEMA batch (an
    Arrow table or a dict of numpy arrays). Pixels are not copied."""
    skipped = _column(batch, "skipped")
    columns = zip(
        _column(batch, "image_id"),
        _pixel_views(batch),
        _column(batch, "height"),
        _column(batch, "width"),
        _column(batch, "orig_height"),
        _column(batch, "orig_width"),
        _column(batch, "boxes"),
        _column(batch, "labels"),
    )
    rows = [
        Row(int(i), px, int(h), int(w), int(oh), int(ow), b, lab)
        for (i, px, h, w, oh, ow, b, lab), s in zip(columns, skipped)
        if not s
    ]
    return rows, len(skipped) - len(rows)


def collate_rows(rows: list[Row]) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Pads rows into (images, mask, targets): the one copy of each image's pixels."""
    max_h = max((r.height for r in rows), default=0)
    max_w = max((r.width for r in rows), default=0)
    # Allocated by numpy, shared with torch: torch's CPU allocator handed out fresh pages for
    # every batch (page faults: 5 ms per 25 MB against 0.6 ms here).
    pixels = np.empty((len(rows), max_h, max_w, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels)
    mask = np.empty((len(rows), max_h, max_w), dtype=bool)
    targets = []
    for k, r in enumerate(rows):
        h, w = r.height, r.width
        # Every byte is written once: the image, then its padding (zero-filling the whole
        # buffer first cost as much as the copy itself).
        pixels[k, :h, :w] = r.pixels.reshape(h, w, 3)
        pixels[k, :h, w:] = 0
        pixels[k, h:] = 0
        mask[k, :h, :w] = False  # (a broadcast comparison cost 6x more)
        mask[k, :h, w:] = True
        mask[k, h:] = True
        targets.append(
            {
                "boxes": torch.tensor(np.asarray(r.boxes, dtype=np.float32)).reshape(-1, 4),
                "labels": torch.tensor(np.asarray(r.labels, dtype=np.int64)).reshape(-1),
                "image_id": r.image_id,
                "orig_size": torch.tensor([r.orig_height, r.orig_width], dtype=torch.int64),
                "size": torch.tensor([h, w], dtype=torch.int64),
            }
        )
    return images.permute(0, 3, 1, 2), torch.from_numpy(mask), targets


def shape_group(height: int, width: int) -> tuple[bool, int]:
    """Images batched together under `group_shapes`: same orientation, longest side in the same
    256-pixel band. On DETR's COCO recipe (every image its own random scale), batch 8, it takes
    the padding from 44% to 20% of a batch's pixels, 0.95 -> 0.67 Mpx per image for the model
    (benchmarks/batch_padding.py; orientation alone: about 35%)."""
    return height >= width, max(height, width) // 256


def collate(batch: Any) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Pads a batch of decoded rows (an Arrow table or a dict of numpy arrays, DECODED_SCHEMA)
    into (images, mask, targets); skipped rows are left out."""
    return collate_rows(image_rows(batch)[0])
