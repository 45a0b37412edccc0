"""DETR outputs -> detections in absolute (x1, y1, x2, y2) pixels of each original image."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert


@torch.no_grad()
def postprocess(
    outputs: dict,
    target_sizes: Tensor | Sequence[Sequence[int]],
    label_to_category_id: Sequence[int] | Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Every query becomes one detection, as in DETR: softmax, drop "no object", best class.

    target_sizes: [B, 2] as (height, width) of each original image.
    label_to_category_id: optional table from contiguous label to the dataset's category id;
    when given, "labels" hold the dataset's own ids.
    Returns per image {"scores": [Q], "labels": [Q] int64, "boxes": [Q, 4] xyxy pixels}.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=logits.device)
    if sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"target_sizes must be [{logits.shape[0]}, 2] (h, w), got {tuple(sizes.shape)}")
    prob = logits.float().softmax(-1)
    scores, labels = prob[..., :-1].max(-1)
    h, w = sizes.unbind(1)
    scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * scale
    if label_to_category_id is not None:
        table = torch.as_tensor(label_to_category_id, dtype=torch.int64, device=labels.device)
        labels = table[labels]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]
