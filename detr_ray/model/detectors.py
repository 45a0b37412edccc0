"""The seam between the trainer/evaluation and the detector: DETR (ours) or a torchvision detector.

`model.arch` picks the architecture (config.ARCHS). Everything downstream goes through four
functions of this module, so DETR and torchvision's Faster R-CNN, RetinaNet and FCOS are trained,
checkpointed, validated, evaluated and served alike:

    build(cfg)                              the model (DETR, or TorchvisionDetector)
    parameter_groups(model, lr, lr_backbone) AdamW groups: the backbone proper at lr_backbone
    load_weights(model, source, categories) --pretrained: DETR's loader, or a torchvision
                                            detector's state dict with its class head mapped
    predict(model, images, mask, targets)   per image {"scores", "labels", "boxes"}: xyxy pixels
                                            of the original image, as DETR's postprocess gives

A torchvision detector is built by torchvision's own builder, with no weights (weights=None,
weights_backbone=None: trainable BatchNorm, every backbone layer trainable) and its
GeneralizedRCNNTransform reduced to batching: the pipeline has already resized and augmented the
images (transforms.py) and the train step has normalised them with the same ImageNet statistics
torchvision uses, so neither is done twice. It computes its own losses (`computes_own_loss`); the
train step sums them.

Labels: the pipeline's are contiguous 0..K-1. Faster R-CNN reserves class 0 for background
(num_classes = K + 1, labels shifted by one); RetinaNet and FCOS score K sigmoid classes
(num_classes = K). torchvision's COCO weights index their class rows by COCO category id (91
rows), which `load_weights` maps to the dataset's categories as weights.py maps DETR's head.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert

from detr_ray.config import DETR_ONLY_SETTINGS, DETRConfig, ExperimentConfig
from detr_ray.model import weights as weights_mod
from detr_ray.model.detr import build_model
from detr_ray.model.detr import parameter_groups as detr_parameter_groups
from detr_ray.model.postprocess import postprocess
from detr_ray.model.weights import LoadReport, WeightsError, log_class_mapping

log = logging.getLogger(__name__)

PREFIX = "detector."  # TorchvisionDetector's state dict: the torchvision model's keys under this
# Class-dependent tensors per family: (module, values per class). Rows are [anchors, classes, values].
CLASS_HEADS = {
    "fasterrcnn": (("roi_heads.box_predictor.cls_score", 1), ("roi_heads.box_predictor.bbox_pred", 4)),
    "retinanet": (("head.classification_head.cls_logits", 1),),
    "fcos": (("head.classification_head.cls_logits", 1),),
}
COCO_ROWS = 91  # torchvision's COCO heads: row = COCO category id (0: background / unused)


def _resnet101_fpn(returned_layers=None, extra_blocks=None):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    # As torchvision's *_resnet50_fpn builders do without weights: BatchNorm2d, all layers trainable.
    return resnet_fpn_backbone(
        backbone_name="resnet101",
        weights=None,
        norm_layer=nn.BatchNorm2d,
        trainable_layers=5,
        returned_layers=returned_layers,
        extra_blocks=extra_blocks,
    )


def _builders() -> dict[str, Callable[[int], nn.Module]]:
    """arch -> builder(num_classes as torchvision counts them)."""
    from torchvision.models import detection as D
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    none = dict(weights=None, weights_backbone=None)
    return {
        "fasterrcnn_resnet50_fpn_v2": lambda k: D.fasterrcnn_resnet50_fpn_v2(num_classes=k, **none),
        "fasterrcnn_resnet50_fpn": lambda k: D.fasterrcnn_resnet50_fpn(num_classes=k, **none),
        "fasterrcnn_resnet101_fpn": lambda k: D.FasterRCNN(_resnet101_fpn(), num_classes=k),
        "fasterrcnn_mobilenet_v3_large_fpn": lambda k: D.fasterrcnn_mobilenet_v3_large_fpn(num_classes=k, **none),
        "retinanet_resnet50_fpn_v2": lambda k: D.retinanet_resnet50_fpn_v2(num_classes=k, **none),
        "retinanet_resnet50_fpn": lambda k: D.retinanet_resnet50_fpn(num_classes=k, **none),
        "retinanet_resnet101_fpn": lambda k: D.RetinaNet(
            _resnet101_fpn([2, 3, 4], LastLevelP6P7(256, 256)), num_classes=k
        ),
        "fcos_resnet50_fpn": lambda k: D.fcos_resnet50_fpn(num_classes=k, **none),
        "fcos_resnet101_fpn": lambda k: D.FCOS(_resnet101_fpn([2, 3, 4], LastLevelP6P7(256, 256)), num_classes=k),
    }


class BatchOnly(GeneralizedRCNNTransform):
    """torchvision's input transform without its normalisation and resizing: images arrive
    normalised and resized by the pipeline, targets in pixels of those images. It still pads the
    batch to a multiple of 32, and its postprocess maps boxes back to the same sizes (a no-op)."""

    def __init__(self):
        super().__init__(min_size=1, max_size=1, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict | None = None):
        return image, target


def image_sizes(mask: Tensor) -> list[tuple[int, int]]:
    """(h, w) of each image's unpadded region (padding is at the bottom and right, True in mask)."""
    valid = ~mask
    heights = valid.any(dim=2).sum(dim=1).tolist()
    widths = valid.any(dim=1).sum(dim=1).tolist()
    return list(zip(heights, widths))


class TorchvisionDetector(nn.Module):
    """A torchvision detector behind DETR's calling convention: (normalised padded images, padding
    mask[, targets]). Training: the loss dict (keys "loss_*"); eval: per image {"scores", "labels"
    (contiguous 0..K-1), "boxes" (xyxy pixels of the unpadded augmented image)}."""

    computes_own_loss = True

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        builders = _builders()
        if arch not in builders:
            raise ValueError(f"model.arch: {arch!r} is not a torchvision detector ({', '.join(builders)})")
        self.arch, self.family = arch, arch.split("_", 1)[0]
        self.label_offset = 1 if self.family == "fasterrcnn" else 0
        self.detector = builders[arch](num_classes + self.label_offset)
        self.detector.transform = BatchOnly()

    def forward(self, images: Tensor, mask: Tensor, targets: list[dict] | None = None):
        sizes = image_sizes(mask)
        crops = [img[:, :h, :w] for img, (h, w) in zip(images, sizes)]
        if not self.training:
            dets = self.detector(crops)
            return [
                {"scores": d["scores"], "labels": d["labels"] - self.label_offset, "boxes": d["boxes"]} for d in dets
            ]
        if targets is None:
            raise ValueError(f"{self.arch}: training needs targets")
        tv_targets = []
        for t, (h, w) in zip(targets, sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=images.device)
            boxes = box_convert(t["boxes"].float(), "cxcywh", "xyxy") * scale
            tv_targets.append({"boxes": boxes, "labels": t["labels"] + self.label_offset})
        losses = self.detector(crops, tv_targets)
        return {k if k.startswith("loss_") else f"loss_{k}": v for k, v in losses.items()}


def build(cfg: DETRConfig) -> nn.Module:
    """The model of `cfg.arch` for cfg.num_classes classes, freshly initialised."""
    if cfg.arch == "detr":
        return build_model(cfg)
    cfg.validate()
    return TorchvisionDetector(cfg.arch, cfg.num_classes)


def ignored_settings(exp: ExperimentConfig) -> list[str]:
    """The DETR-only settings a torchvision detector's run ignores (none for DETR); logged once."""
    if exp.model.arch == "detr":
        return []
    names = [f"{section}.{key}" for section, keys in DETR_ONLY_SETTINGS.items() for key in keys]
    log.info("model.arch=%s: settings that apply to DETR only are ignored: %s", exp.model.arch, ", ".join(names))
    return names


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def computes_own_loss(model: nn.Module) -> bool:
    return getattr(_inner(model), "computes_own_loss", False)


def parameter_groups(model: nn.Module, lr: float, lr_backbone: float) -> list[dict]:
    """DETR's groups for DETR; for a torchvision detector the backbone proper (ResNet/MobileNet,
    `backbone.body`) at lr_backbone and everything else (FPN, heads) at lr."""
    if not computes_own_loss(model):
        return detr_parameter_groups(model, lr, lr_backbone)
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.split("module.", 1)[-1].startswith(PREFIX + "backbone.body.") else rest).append(p)
    return [
        {"params": rest, "lr": lr, "name": "transformer"},
        {"params": backbone, "lr": lr_backbone, "name": "backbone"},
    ]


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    mask: Tensor,
    targets: Sequence[dict],
    label_to_category_id: Sequence[int] | Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Normalised images -> per image {"scores", "labels", "boxes" xyxy in pixels of the original
    image (targets' "orig_size")}; labels are the dataset's category ids when the table is given.
    DETR: every query (postprocess); torchvision detectors: their own NMS-ed detections."""
    orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(images.device)
    if not computes_own_loss(model):
        return postprocess(model(images, mask), orig, label_to_category_id)
    table = (
        None
        if label_to_category_id is None
        else torch.as_tensor(label_to_category_id, dtype=torch.int64, device=images.device)
    )
    out = []
    for d, (h, w), (oh, ow) in zip(model(images, mask), image_sizes(mask), orig.tolist()):
        scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=torch.float32, device=images.device)
        labels = d["labels"] if table is None else table[d["labels"]]
        out.append({"scores": d["scores"], "labels": labels, "boxes": d["boxes"].float() * scale})
    return out


# --------------------------------------------------------------------------------------------
# Weights


def load_weights(model: nn.Module, source: str, *, categories: Sequence[tuple[int, str]] | None = None) -> LoadReport:
    """`--pretrained` for any architecture. DETR: weights.load_pretrained. A torchvision detector:
    a state dict of the same torchvision model (a file of torchvision's COCO weights, say), or a
    detr-ray checkpoint of the same arch; with `categories`, its class rows are mapped by category
    (weights.py's rules: by id and name, else by name, else new) when the source's rows are known
    (91 rows: COCO ids; a detr-ray checkpoint: its category table). Everything else must fit."""
    inner = _inner(model)
    if not isinstance(inner, TorchvisionDetector):
        return weights_mod.load_pretrained(model, source, categories=categories)
    if str(source) == "torchvision":
        raise WeightsError(
            f"'torchvision' (ImageNet backbone weights) is DETR's; {inner.arch} takes a state dict of the whole "
            "detector"
        )
    sd, table = weights_mod._read_source(source)
    sd = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    target = inner.detector.state_dict()
    report = LoadReport(str(source), "torchvision_detector")
    if categories is not None:
        sd = _map_class_heads(inner, sd, target, table, list(categories), report)
    unexpected = sorted(set(sd) - set(target))
    missing = sorted(k for k in set(target) - set(sd) if not k.endswith("num_batches_tracked"))
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if unexpected or missing or wrong:
        raise WeightsError(
            f"{source}: not a state dict of {inner.arch} with this model's classes: {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]}), {len(wrong)} of another shape "
            f"(e.g. {wrong[:3]})"
        )
    inner.detector.load_state_dict(sd, strict=False)
    report.loaded = sorted(sd)
    log_class_mapping(source, report)
    return report


def _map_class_heads(inner: TorchvisionDetector, sd, target, table, categories, report) -> dict[str, Tensor]:
    heads = CLASS_HEADS[inner.family]
    first = heads[0][0]
    if f"{first}.bias" not in sd:
        return sd  # not this family's state dict: the key check names what is wrong
    anchors = _anchors(inner, first)
    k_dst = target[f"{first}.bias"].shape[0] // anchors
    if len(categories) + inner.label_offset != k_dst:
        raise WeightsError(
            f"{report.source}: {len(categories)} dataset categories given for a model with "
            f"{k_dst - inner.label_offset} classes"
        )
    k_src = sd[f"{first}.bias"].shape[0] // anchors
    if table is not None:
        if len(table) + inner.label_offset != k_src:
            raise WeightsError(
                f"{report.source}: its category table has {len(table)} categories but its class head {k_src} rows"
            )
        rows = {label + inner.label_offset: (cid, name) for label, (cid, name) in enumerate(table)}
    elif k_src == COCO_ROWS:
        rows = {cid: (cid, name) for cid, name in weights_mod.COCO_CATEGORIES.items()}
    else:
        log.info("%s: its class rows are not known categories; not mapped by category", report.source)
        return sd
    report.classes = weights_mod._match_classes(categories, rows)
    pairs = [(m.label + inner.label_offset, m.source_row) for m in report.classes if m.source_row is not None]
    if inner.label_offset:
        pairs.append((0, 0))  # background
    sd = dict(sd)
    for module, per_class in heads:
        for kind in ("weight", "bias"):
            key = f"{module}.{kind}"
            sd[key] = _rows(target[key], sd[key], anchors, per_class, pairs)
    return sd


def _anchors(inner: TorchvisionDetector, module: str) -> int:
    head = inner.detector.get_submodule(module.rsplit(".", 1)[0])
    return int(getattr(head, "num_anchors", 1))


def _rows(dst: Tensor, src: Tensor, anchors: int, per_class: int, pairs: list[tuple[int, int]]) -> Tensor:
    """`dst` (the model's own, freshly initialised) with class rows copied from `src`:
    rows are laid out [anchors, classes, per_class] along dim 0, as torchvision's heads lay them."""
    tail = dst.shape[1:]
    d = dst.detach().clone().reshape(anchors, -1, per_class, *tail)
    s = src.reshape(anchors, -1, per_class, *tail)
    if s.shape[3:] != d.shape[3:]:
        return src  # another feature size: the shape check reports it
    for dst_row, src_row in pairs:
        d[:, dst_row] = s[:, src_row]
    return d.reshape(dst.shape)
