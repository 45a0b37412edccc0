"""ResNet backbone with frozen BatchNorm, as DETR uses it.

The module tree reproduces the reference implementation's parameter names exactly
(`backbone.0.body.layer1.0.conv1.weight`, ...), so published DETR checkpoints load without any
key renaming: `Joiner` is a two-element Sequential (backbone, position embedding) and the ResNet
lives under `.body`, truncated after layer4 by torchvision's IntermediateLayerGetter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from detr_ray.model.position import PositionEmbeddingSine

# Parameters whose names contain one of these train (at the backbone learning rate); the stem
# (conv1, bn1) and layer1 stay frozen, as in DETR.
TRAINABLE_STAGES = ("layer2", "layer3", "layer4")


class Backbone(nn.Module):
    """torchvision ResNet up to layer4 (or layer3 with stages=3), FrozenBatchNorm2d everywhere,
    stride 32 (16 with DC5 or stages=3)."""

    def __init__(
        self, name: str, train_backbone: bool = True, dilation: bool = False, frozen_bn: bool = True, stages: int = 4
    ):
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
        )
        for pname, p in resnet.named_parameters():
            # With trainable BatchNorm (training from scratch) every stage learns.
            frozen_stage = frozen_bn and not any(s in pname for s in TRAINABLE_STAGES)
            if not train_backbone or frozen_stage:
                p.requires_grad_(False)
        # The getter keeps the modules up to the returned layer only: with stages=3 there is no layer4.
        self.body = IntermediateLayerGetter(resnet, return_layers={f"layer{stages}": "0"})
        last_stage_channels = 512 if name in ("resnet18", "resnet34") else 2048
        self.num_channels = last_stage_channels >> (4 - stages)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W], mask [B,H,W] True on padding -> (features [B,C,h,w], mask [B,h,w])."""
        features = self.body(images)["0"]
        # Nearest-neighbour downsampling of the padding mask, as in the reference.
        small = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, small


class Joiner(nn.Sequential):
    """(backbone, position embedding): returns features, their mask and position encodings."""

    def __init__(self, backbone: Backbone, position: PositionEmbeddingSine):
        super().__init__(backbone, position)
        self.num_channels = backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features, small_mask = self[0](images, mask)
        pos = self[1](small_mask).to(features.dtype)
        return features, small_mask, pos


def build_backbone(
    name: str, hidden_dim: int, train_backbone: bool, dilation: bool, frozen_bn: bool = True, stages: int = 4
) -> Joiner:
    return Joiner(
        Backbone(name, train_backbone=train_backbone, dilation=dilation, frozen_bn=frozen_bn, stages=stages),
        PositionEmbeddingSine(hidden_dim // 2, normalize=True),
    )


@torch.no_grad()
def calibrate_frozen_batchnorm(backbone: nn.Module, images: torch.Tensor) -> int:
    """Sets every FrozenBatchNorm2d's statistics to the per-channel mean and variance of its input
    on `images` (normalized float [B,3,H,W]), layer by layer, with affine weight 1 and bias 0.

    For a backbone with no pretrained weights only: frozen BatchNorm at its identity defaults
    leaves a deep ResNet unnormalized, and activations grow without bound (ResNet-101 reaches inf
    in fp32). One calibration pass gives every layer unit-scale inputs, as trained BatchNorm
    statistics would. Returns the number of layers calibrated.
    """
    layers = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]

    def set_stats(module, args):
        x = args[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        module.weight.fill_(1.0)
        module.bias.fill_(0.0)

    handles = [m.register_forward_pre_hook(set_stats) for m in layers]
    try:
        body = backbone[0].body if isinstance(backbone, Joiner) else backbone
        body(images)
    finally:
        for h in handles:
            h.remove()
    return len(layers)
