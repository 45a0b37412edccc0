"""Pretrained weights: published DETR checkpoints, torchvision ImageNet backbones, transfer.

Sources (`load_pretrained(model, source)`):
  * a local file or an http(s) URL holding a DETR checkpoint in the reference layout: a dict whose
    "model" entry is the state dict (detr-r50-e632da11.pth, detr-r101-2c7b67e5.pth, the DC5
    variants, or a checkpoint.pth written by the reference training script), or a bare state dict;
  * a local file or URL holding a torchvision ResNet state dict (ImageNet classification weights);
  * "torchvision" (the backbone's ImageNet weights DETR used, downloaded through torchvision) or
    "torchvision:ResNet101_Weights.IMAGENET1K_V2" for an explicit weights enum member.

Every tensor of the source is accounted for: loaded, or skipped with a logged reason. Heads that
depend on the dataset or the backbone (class head, input projection, object queries) are
re-initialised when their shapes differ; a DETR checkpoint whose backbone is another ResNet
(R50 -> R101 transfer) loads everything but the backbone. Anything else that does not fit is an
error. Files are read with torch.load(weights_only=True): pickled code is refused.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone.0.body."
# DETR's default ImageNet weights per backbone (the reference used torchvision's V1 weights).
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
}
# Heads that legitimately change shape with the dataset or the backbone: re-initialised, logged.
REPLACEABLE_HEADS = ("class_embed.", "input_proj.", "query_embed.")


class WeightsError(ValueError):
    """A weights source cannot be read or does not fit the model. The message says which."""


@dataclass
class LoadReport:
    source: str
    kind: str  # "detr" or "imagenet_backbone"
    loaded: list[str] = field(default_factory=list)
    reinitialized: dict[str, str] = field(default_factory=dict)  # model module -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> reason

    def summary(self) -> str:
        return (
            f"{self.source} ({self.kind}): {len(self.loaded)} tensors loaded, "
            f"{len(self.skipped)} skipped, re-initialised: {sorted(self.reinitialized) or 'none'}"
        )


def _torch_load(f, where: str) -> object:
    # argparse.Namespace appears in checkpoints written by the reference training script ("args");
    # it is a plain attribute holder and safe to rebuild. Everything else must be tensors/containers.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: say which file and why
        raise WeightsError(
            f"{where}: refused or unreadable checkpoint (loaded with weights_only=True, so "
            f"pickled objects other than tensors are not allowed): {e}"
        ) from e


def read_state_dict(source: str | Path) -> dict[str, Tensor]:
    """Reads a state dict from a file, a URL, or a torchvision weights enum ("torchvision:...")."""
    src = str(source)
    if src.startswith("torchvision:"):
        enum_name, _, member = src.split(":", 1)[1].partition(".")
        weights_enum = getattr(torchvision.models, enum_name, None)
        if weights_enum is None or not hasattr(weights_enum, member):
            raise WeightsError(f"{src}: no such torchvision weights (e.g. ResNet50_Weights.IMAGENET1K_V1)")
        obj = getattr(weights_enum, member).get_state_dict(progress=True)
    elif src.startswith(("http://", "https://")):
        try:
            obj = torch.hub.load_state_dict_from_url(src, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{src}: cannot fetch or read: {e}") from e
    else:
        path = Path(src)
        if not path.is_file():
            raise WeightsError(f"{src}: no such file")
        obj = _torch_load(path, src)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{src}: expected a state dict (or a dict with a 'model' state dict), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{src}: entries that are not tensors: {bad[:5]}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_detr_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("transformer.", "class_embed.", "backbone.0.body.")) for k in sd)


def _is_resnet_layout(sd: Mapping[str, Tensor]) -> bool:
    return "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd)


def _reset(module: nn.Module) -> None:
    """Fresh default initialisation of a head (nn.Linear / nn.Conv2d / nn.Embedding / MLP)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            m.reset_parameters()


def load_pretrained(model: nn.Module, source: str | Path, *, include_backbone: bool = True) -> LoadReport:
    """Loads `source` into `model` in place and returns what was loaded, skipped, re-initialised.

    `model` is a detr_ray DETR (possibly wrapped in DDP). With source "torchvision", the ImageNet
    weights of the model's own backbone are downloaded through torchvision (online only).
    """
    inner = getattr(model, "module", model)
    if str(source) == "torchvision":
        source = f"torchvision:{IMAGENET_WEIGHTS[inner.cfg.backbone]}"
    sd = read_state_dict(source)
    target = inner.state_dict()
    if _is_resnet_layout(sd) and not _is_detr_layout(sd):
        report = _load_backbone(inner, sd, target, str(source))
    elif _is_detr_layout(sd):
        report = _load_detr(inner, sd, target, str(source), include_backbone)
    else:
        raise WeightsError(
            f"{source}: neither a DETR state dict (transformer.*, class_embed.*) nor a ResNet one "
            f"(conv1.weight, layer1.*); first keys: {list(sd)[:5]}"
        )
    for key, why in report.skipped.items():
        log.info("%s: skipped %s (%s)", source, key, why)
    for name, why in report.reinitialized.items():
        log.warning("%s: re-initialised %s (%s)", source, name, why)
    log.info("%s", report.summary())
    return report


def _load_backbone(model, sd, target, source) -> LoadReport:
    report = LoadReport(source, "imagenet_backbone")
    picked = {}
    for k, v in sd.items():
        if k.startswith("fc."):
            report.skipped[k] = "ImageNet classifier; DETR has no use for it"
        elif k.endswith("num_batches_tracked") and BACKBONE_PREFIX + k not in target:
            report.skipped[k] = "BatchNorm step counter; FrozenBatchNorm2d keeps none"
        else:
            picked[BACKBONE_PREFIX + k] = v
    own = {k for k in target if k.startswith(BACKBONE_PREFIX)}
    unexpected = sorted(set(picked) - own)
    missing = sorted(k for k in own - set(picked) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise WeightsError(
            f"{source}: ResNet weights do not fit the model's {model.cfg.backbone} backbone: "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]})"
        )
    _check_shapes(picked, target, source)
    model.load_state_dict(picked, strict=False)
    report.loaded = sorted(picked)
    return report


def _check_shapes(sd, target, source) -> None:
    wrong = [f"{k}: source {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in sd.items() if v.shape != target[k].shape]
    if wrong:
        raise WeightsError(f"{source}: shape mismatch in {len(wrong)} tensors: " + "; ".join(wrong[:5]))


def _load_detr(model, sd, target, source, include_backbone) -> LoadReport:
    report = LoadReport(source, "detr")
    sd = dict(sd)
    not_loaded = set()  # model keys that keep the model's own values
    own_bb = {k for k in target if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    src_bb = {k for k in sd if k.startswith("backbone.")}
    backbone_fits = src_bb == own_bb and all(sd[k].shape == target[k].shape for k in own_bb)
    if not include_backbone or not backbone_fits:
        why = (
            "backbone not requested"
            if not include_backbone
            else f"checkpoint backbone ({len(src_bb)} tensors) is not the model's {model.cfg.backbone} "
            f"({len(own_bb)} tensors); the model keeps its own backbone"
        )
        if include_backbone:
            log.warning("%s: %s", source, why)
        for k in src_bb:
            report.skipped[k] = why
            del sd[k]
        not_loaded |= own_bb
    # Dataset- or backbone-dependent heads: re-initialised when their shape changes.
    for prefix in REPLACEABLE_HEADS:
        keys = [k for k in sd if k.startswith(prefix)]
        changed = [k for k in keys if k in target and sd[k].shape != target[k].shape]
        if not changed:
            continue
        name = prefix.rstrip(".")
        _reset(getattr(model, name))
        report.reinitialized[name] = "shape differs: " + ", ".join(
            f"{k} {tuple(sd[k].shape)} -> {tuple(target[k].shape)}" for k in changed
        )
        for k in keys:
            report.skipped[k] = f"{name} re-initialised for the new shape"
            del sd[k]
        not_loaded |= {k for k in target if k.startswith(prefix)}
    unexpected = sorted(set(sd) - set(target))
    # A trainable-BatchNorm model (frozen_bn=False) has step counters no checkpoint needs to carry.
    missing = sorted(k for k in set(target) - not_loaded - set(sd) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise WeightsError(
            f"{source}: DETR checkpoint does not fit the model: {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]}); check "
            f"hidden_dim, enc_layers, dec_layers, pre_norm against the checkpoint"
        )
    _check_shapes(sd, target, source)
    model.load_state_dict(sd, strict=False)
    report.loaded = sorted(sd)
    return report
