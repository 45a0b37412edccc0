"""The one prediction path: padded uint8 images -> COCO result dicts.

    normalize (ImageNet statistics, on the model's device)
    -> detectors.predict (DETR: every query through postprocess; a torchvision detector: its own
       detections), boxes as xyxy pixels of the original image
    -> detections_to_results: COCO result dicts (xywh pixels, the dataset's category ids)

Validation during training (train/loop.py), batch inference (evaluation/inference.py's Predictor)
and serving (through that Predictor) all call `predict_batch`, so the AP a run reports while it
trains and the AP its checkpoint scores later come from the same computation. It sits below
train/ and evaluation/ so that neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from detr_ray.model.detectors import predict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: Tensor, channels_last: bool = False) -> Tensor:
    """uint8 [B,3,H,W] (any memory layout) -> float32 normalized with ImageNet statistics, on the
    images' device, in channels-last layout if asked, else contiguous. The layout change rides on
    the dtype conversion: no extra copy."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(torch.float32, memory_format=layout)
    return x.sub_(mean).div_(std)


def detections_to_results(
    image_ids: Sequence[int], detections: Sequence[dict], label_to_category_id: Sequence[int] | None = None
) -> list[dict]:
    """postprocess() output (xyxy pixels) -> COCO result dicts (xywh pixels), one per query."""
    results = []
    for image_id, det in zip(image_ids, detections):
        boxes = det["boxes"].detach().cpu().double()
        xywh = box_convert(boxes, "xyxy", "xywh").tolist()
        labels = det["labels"].detach().cpu().tolist()
        scores = det["scores"].detach().cpu().tolist()
        for box, label, score in zip(xywh, labels, scores):
            category = label_to_category_id[label] if label_to_category_id is not None else label
            results.append(
                {"image_id": int(image_id), "category_id": int(category), "bbox": box, "score": float(score)}
            )
    return results


@dataclass
class Predictions:
    detections: list[dict[str, Tensor]]  # per image {"scores", "labels" 0..K-1, "boxes" xyxy pixels}
    results: list[dict]  # COCO result dicts, image by image in batch order, query order within an image


@torch.no_grad()
def predict_batch(
    model: nn.Module, images: Tensor, mask: Tensor, targets: Sequence[dict], label_to_category_id: Sequence[int]
) -> Predictions:
    """One collated batch (collate: uint8 images, padding mask, targets with "image_id" and
    "orig_size") through `model`, which the caller has put in eval mode. Images and mask move to
    the model's device."""
    device = next(model.parameters()).device
    dets = predict(model, normalize(images.to(device)), mask.to(device), targets)
    return Predictions(dets, detections_to_results([t["image_id"] for t in targets], dets, label_to_category_id))
