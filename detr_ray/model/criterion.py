"""DETR's set loss: after Hungarian matching, cross-entropy on every query (matched queries
against their target's class, the rest against "no object" with weight eos_coef), and L1 + GIoU
on the matched boxes, normalized by the number of target boxes. The same losses are computed on
every decoder layer's output when auxiliary outputs are present (`loss_ce_0`, ...).

Distributed: the box count and the cross-entropy's weight sum are averaged over all workers, so
that DDP's gradient averaging reproduces the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from detr_ray.model.matcher import HungarianMatcher


def default_weight_dict(
    num_dec_layers: int, ce: float = 1.0, bbox: float = 5.0, giou: float = 2.0, aux_loss: bool = True
) -> dict[str, float]:
    """Loss weights: the paper's 1 / 5 / 2, repeated for each auxiliary decoder layer."""
    base = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(base)
    if aux_loss:
        for i in range(num_dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def _global_mean(value: Tensor) -> Tensor:
    """Mean of `value` over workers (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class SetCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def _layer_losses(self, out: dict, labels: Tensor, boxes: Tensor, idx: Tensor, num_boxes: Tensor) -> dict:
        """Losses of one decoder layer. idx [3, M]: image, query and (flat) target index of each
        match; labels/boxes: the batch's targets concatenated."""
        logits = out["pred_logits"].float()
        batch_idx, src_idx, tgt_idx = idx
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = labels[tgt_idx]
        # Weighted mean over all queries, with the weight sum averaged across workers.
        ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight, reduction="none")
        weight_sum = _global_mean(self.empty_weight[target_classes].sum().detach())
        src_boxes = out["pred_boxes"][batch_idx, src_idx].float()
        tgt_boxes = boxes[tgt_idx]
        giou = torch.diag(
            generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        )
        return {
            "loss_ce": ce.sum() / weight_sum,
            "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def _upload_indices(self, matches, sizes: list[int], device: torch.device) -> tuple[list[Tensor], Tensor]:
        """Packs every layer's match indices (image, query, flat target) and the per-image target
        counts into one buffer and copies it to the device once."""
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        parts, counts = [], []
        for per_image in matches:
            b = np.concatenate([np.full(len(r), i, np.int64) for i, (r, _) in enumerate(per_image)])
            q = np.concatenate([r for r, _ in per_image])
            t = np.concatenate([c + offsets[i] for i, (_, c) in enumerate(per_image)])
            parts.append(np.stack([b, q, t]).reshape(-1))
            counts.append(len(b))
        flat = torch.from_numpy(np.concatenate(parts + [np.asarray(sizes, np.int64)]))
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        chunks = flat.split([3 * c for c in counts] + [len(sizes)])
        return [c.view(3, -1) for c in chunks[:-1]], chunks[-1]

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """targets: list of {"labels": int64[N], "boxes": float[N,4] normalized cx,cy,w,h}.
        Returns unweighted losses (see `weighted_total`) plus logging-only `class_error` (%) and
        `cardinality_error`. Every decoder layer is matched in one batched pass (one transfer to
        the host for the costs, one back for the indices); nothing else synchronises."""
        device = outputs["pred_logits"].device
        layers = [outputs] + list(outputs.get("aux_outputs", []))
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
        sizes = [len(t["labels"]) for t in targets]
        num_boxes = _global_mean(torch.full((), float(sum(sizes)), device=device)).clamp(min=1.0)

        matches = self.matcher.match_layers(layers, targets)
        indices, card_tgt = self._upload_indices(matches, sizes, device)

        losses = self._layer_losses(outputs, labels, boxes, indices[0], num_boxes)
        for i, (aux, idx) in enumerate(zip(layers[1:], indices[1:])):
            losses.update({f"{k}_{i}": v for k, v in self._layer_losses(aux, labels, boxes, idx, num_boxes).items()})

        with torch.no_grad():
            logits = outputs["pred_logits"]
            batch_idx, src_idx, tgt_idx = indices[0]
            correct = (logits[batch_idx, src_idx].argmax(-1) == labels[tgt_idx]).float()
            # 100 - accuracy (%) of the matched queries' classes; 0 when nothing was matched.
            losses["class_error"] = 100 - correct.mean() * 100 if len(correct) else torch.zeros((), device=device)
            card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
            losses["cardinality_error"] = F.l1_loss(card_pred, card_tgt.float())
        return losses

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """The training objective: sum of weight_dict[k] * losses[k]."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def build_criterion(cfg, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, eos_coef=0.1) -> SetCriterion:
    """The paper's matcher and loss weights for a DETRConfig."""
    matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou)
    weights = default_weight_dict(cfg.dec_layers, 1.0, cost_bbox, cost_giou, aux_loss=cfg.aux_loss)
    return SetCriterion(cfg.num_classes, matcher, weights, eos_coef=eos_coef)
