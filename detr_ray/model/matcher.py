"""Hungarian matching between DETR's predictions and the ground truth of each image."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Per image, the one-to-one assignment of queries to targets minimizing
    cost_class * (-p(target class)) + cost_bbox * L1(boxes) + cost_giou * (-GIoU(boxes)).

    Cost matrices for the whole batch are built in one pass on the model's device, in float32,
    and copied to the host once; each image is then solved with scipy's linear_sum_assignment.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrices(self, layers: list[dict], targets: list[dict]) -> np.ndarray:
        """Costs of every (layer, image, query, target) as one host array [L, B, Q, N_total]:
        computed for all decoder layers and all images in one pass on the model's device, in
        float32, and copied to the host once. Image b's own block is [:, b, :, offsets of b]."""
        logits = torch.stack([o["pred_logits"] for o in layers]).float()  # [L, B, Q, K+1]
        boxes = torch.stack([o["pred_boxes"] for o in layers]).float()  # [L, B, Q, 4]
        nl, bs, nq = logits.shape[:3]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device).float()
        if len(tgt_ids) == 0:
            return np.zeros((nl, bs, nq, 0), dtype=np.float32)
        prob = logits.flatten(1, 2).softmax(-1)  # [L, B*Q, K+1]
        out_boxes = boxes.flatten(0, 2)  # [L*B*Q, 4]
        giou = generalized_box_iou(box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = (
            -self.cost_class * prob[..., tgt_ids]
            + self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1).view(nl, bs * nq, -1)
            - self.cost_giou * giou.view(nl, bs * nq, -1)
        )
        return cost.view(nl, bs, nq, -1).cpu().numpy()

    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Matching for several decoder layers' outputs against the same targets, with a single
        device->host transfer. Returns, per layer and per image, (query indices, target indices)
        as int64 numpy arrays sorted by query index."""
        cost = self.cost_matrices(layers, targets)
        if not np.isfinite(cost).all():
            raise FloatingPointError("non-finite predictions reached the Hungarian matcher (the model diverged)")
        sizes = [len(t["labels"]) for t in targets]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        result = []
        for layer_cost in cost:
            per_image = []
            for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                if hi == lo:
                    per_image.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                    continue
                rows, cols = linear_sum_assignment(layer_cost[b, :, lo:hi])
                per_image.append((rows.astype(np.int64), cols.astype(np.int64)))
            result.append(per_image)
        return result

    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """One layer's matching: per image (query indices, target indices), int64 CPU tensors
        sorted by query index, one pair per matched target."""
        return [(torch.from_numpy(r), torch.from_numpy(c)) for r, c in self.match_layers([outputs], targets)[0]]
