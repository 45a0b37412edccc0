"""The DETR detector: backbone -> 1x1 projection -> transformer -> class and box heads."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from detr_ray.config import DETRConfig
from detr_ray.model.backbone import Joiner, build_backbone
from detr_ray.model.transformer import Transformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box head: 3 layers)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    def __init__(self, backbone: Joiner, transformer: Transformer, cfg: DETRConfig):
        super().__init__()
        hidden = transformer.d_model
        self.cfg = cfg
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden, kernel_size=1)
        self.query_embed = nn.Embedding(cfg.num_queries, hidden)
        self.class_embed = nn.Linear(hidden, cfg.num_classes + 1)  # last logit: no object
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        self.aux_loss = cfg.aux_loss

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images float [B,3,H,W] (normalized), mask bool [B,H,W] True on padding."""
        features, small_mask, pos = self.backbone(images, mask)
        hs = self.transformer(self.input_proj(features), small_mask, self.query_embed.weight, pos)
        logits = self.class_embed(hs)  # [L, B, Q, K+1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4] normalized cx, cy, w, h
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


def build_model(cfg: DETRConfig) -> DETR:
    """Builds DETR from `cfg` with freshly initialised weights (see weights.load_pretrained)."""
    cfg.validate()
    backbone = build_backbone(
        cfg.backbone, cfg.hidden_dim, cfg.train_backbone, cfg.dilation, cfg.frozen_bn, cfg.backbone_stages
    )
    transformer = Transformer(
        d_model=cfg.hidden_dim,
        nhead=cfg.nheads,
        num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        pre_norm=cfg.pre_norm,
    )
    return DETR(backbone, transformer, cfg)


def parameter_groups(model: nn.Module, lr: float, lr_backbone: float) -> list[dict]:
    """AdamW parameter groups: the trainable backbone at `lr_backbone`, the rest at `lr`.
    Frozen parameters (stem, layer1, FrozenBatchNorm) are in neither."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # "module." prefix appears under DDP.
        (backbone if name.split("module.", 1)[-1].startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": lr, "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
    return groups
