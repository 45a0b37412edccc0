"""Pretrained weights: published DETR checkpoints, torchvision ImageNet backbones, transfer.

Sources (`load_pretrained(model, source, categories=...)`):
  * a local file or an http(s) URL holding a DETR checkpoint in the reference layout: a dict whose
    "model" entry is the state dict (detr-r50-e632da11.pth, detr-r101-2c7b67e5.pth, the DC5
    variants, or a checkpoint.pth written by the reference training script), or a bare state dict;
  * a local detr-ray checkpoint directory (detr_ray/checkpoint.py), which carries its category table;
  * a local file or URL holding a torchvision ResNet state dict (ImageNet classification weights);
  * "torchvision" (the backbone's ImageNet weights DETR used, downloaded through torchvision) or
    "torchvision:ResNet101_Weights.IMAGENET1K_V2" for an explicit weights enum member.

Local files, http(s) URLs (downloaded once into torch hub's cache, under a name that includes
the URL's hash) and storage URIs (s3://, gs://, file://, read through pyarrow) are read alike.
`infer_model_config` tells the architecture a reference-layout DETR state dict was trained as
(scripts/evaluate.py scores published checkpoints with it).

Every tensor of the source is accounted for: loaded, or skipped with a logged reason. Heads that
depend on the dataset or the backbone (class head, input projection, object queries) are
re-initialised when their shapes differ; a DETR checkpoint whose backbone is another ResNet
(R50 -> R101 transfer) loads everything but the backbone. Anything else that does not fit is an
error. Files are read with torch.load(weights_only=True): pickled code is refused.

The class head mapped by category. Given the dataset's categories (`categories`: the (category
id, name) of each contiguous label 0..K-1, as in the shards' `_meta.json`), the model's class head
is built row by row from the source's when the source says which category each of its rows is:
  * a head of 92 logits (the published checkpoints, the reference's num_classes=91) is indexed by
    COCO category id (row c is COCO category c, `COCO_CATEGORIES`; ids without a category and
    row 0 are unused), the last row is no-object;
  * a detr-ray checkpoint's head is indexed by its own contiguous labels; its state.json names the
    category id and name of each.
Label i of the dataset takes the source row of the category with the same id, when that row's
name is also the same ("mapped by id"); otherwise the source row whose name is the same ("mapped
by name"; names compare case- and whitespace-insensitively: "Traffic Light" = "trafficlight");
otherwise a freshly initialised row, as DETR initialises its class head ("new"). The no-object row
is the source's no-object row. `LoadReport.classes` lists how each label was mapped.

So the mapped model's logits are, for every query, exactly the source model's logits of those
categories and of no-object. Its probabilities (softmax over K + 1 logits) are the source's
probabilities of those categories and no-object renormalised to sum to 1: the source's mass on
its other categories has no class to go to.

One module, though a long one: reading a source, telling its layout, mapping its class head and
loading it all feed one LoadReport and raise one WeightsError, and a reader checking why a tensor
was loaded or skipped finds the whole path here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torchvision
from torch import Tensor, nn

from detr_ray import checkpoint as ckpt
from detr_ray.data import storage

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

# The 80 COCO (2014/2017 detection) categories: id -> name, as in instances_val2017.json.
COCO_CATEGORIES: dict[int, str] = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}
# The published heads: num_classes=91 (the largest COCO id + 1) plus no-object.
COCO_ID_HEAD_ROWS = 92


class WeightsError(ValueError):
    """A weights source cannot be read or does not fit the model. The message says which."""


@dataclass(frozen=True)
class ClassMatch:
    """Where label `label` of the model's class head came from."""

    label: int
    category_id: int
    name: str
    how: str  # "id", "name" or "new"
    source_row: int | None = None  # the source class head's row; None for "new"
    source_name: str = ""


@dataclass
class LoadReport:
    source: str
    kind: str  # "detr" or "imagenet_backbone"
    loaded: list[str] = field(default_factory=list)
    reinitialized: dict[str, str] = field(default_factory=dict)  # model module -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    classes: list[ClassMatch] = field(default_factory=list)  # empty: class head not mapped by category

    def _how(self, how: str) -> list[ClassMatch]:
        return [m for m in self.classes if m.how == how]

    @property
    def mapped_by_id(self) -> list[ClassMatch]:
        return self._how("id")

    @property
    def mapped_by_name(self) -> list[ClassMatch]:
        return self._how("name")

    @property
    def new_classes(self) -> list[ClassMatch]:
        return self._how("new")

    def summary(self) -> str:
        text = (
            f"{self.source} ({self.kind}): {len(self.loaded)} tensors loaded, "
            f"{len(self.skipped)} skipped, re-initialised: {sorted(self.reinitialized) or 'none'}"
        )
        if self.classes:

            def names(matches, arrow=False):
                shown = [f"{m.name}<-{m.source_name}" if arrow else m.name for m in matches[:20]]
                more = f" and {len(matches) - 20} more" if len(matches) > 20 else ""
                return f" ({', '.join(shown)}{more})" if matches else ""

            by_id, by_name, new = self.mapped_by_id, self.mapped_by_name, self.new_classes
            text += (
                f"; class head mapped by category: {len(by_id)} by id{names(by_id)}, "
                f"{len(by_name)} by name{names(by_name, arrow=True)}, {len(new)} new{names(new)}"
            )
        return text


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
    """Reads a state dict from a file, a URL, a torchvision weights enum ("torchvision:...") or a
    detr-ray checkpoint directory."""
    return _read_source(source)[0]


def read_reference_checkpoint(source: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(state dict, the reference training script's `args` as a dict, {} when the file has none)
    of a DETR file in the reference layout (a local file or URI; see _read_source)."""
    obj = _read_object(str(source))
    args = obj.get("args") if isinstance(obj, Mapping) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    return _state_dict_of(obj, str(source)), args


def _fetch_url(url: str) -> Path:
    """A downloaded copy of `url` in torch hub's cache, named after the URL's hash as well as its
    file name: two different files published under the same name never share a cache entry."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"{key}-{name}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:
            raise WeightsError(f"{url}: cannot fetch: {e}") from e
    return path


def _read_object(src: str) -> object:
    """The unpickled (weights_only) content of a weights file: local path, http(s) URL or a
    storage URI (s3://, gs://, file://)."""
    if src.startswith(("http://", "https://")):
        return _torch_load(_fetch_url(src), src)
    if storage.is_uri(src):
        try:
            data = storage.read_bytes(src)
        except (OSError, ValueError) as e:  # missing object, a directory, an unknown scheme
            raise WeightsError(f"{src}: cannot read: {e}") from e
        return _torch_load(io.BytesIO(data), src)
    path = Path(src)
    if not path.is_file():
        raise WeightsError(f"{src}: no such file")
    return _torch_load(path, src)


def _state_dict_of(obj: object, src: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{src}: expected a state dict (or a dict with a 'model' state dict), got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{src}: entries that are not tensors: {bad[:5]}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read_source(source: str | Path) -> tuple[dict[str, Tensor], list[tuple[int, str]] | None]:
    """The state dict and, for a detr-ray checkpoint, the (category id, name) of each label."""
    src = str(source)
    table = None
    if not storage.is_uri(src) and Path(src).is_dir():
        try:
            loaded = ckpt.load(src)
        except ckpt.CheckpointError as e:
            raise WeightsError(f"{src}: not a readable detr-ray checkpoint directory: {e}") from e
        obj = loaded.model
        cats = loaded.state.categories
        try:
            table = [(int(c), str(n)) for c, n in zip(cats["label_to_category_id"], cats["names"], strict=True)]
        except (KeyError, TypeError, ValueError) as e:
            log.warning(
                "%s: %s has no usable category table (%s); its class head cannot be mapped by category",
                src,
                ckpt.STATE,
                e,
            )
    elif src.startswith("torchvision:"):
        enum_name, _, member = src.split(":", 1)[1].partition(".")
        weights_enum = getattr(torchvision.models, enum_name, None)
        if weights_enum is None or not hasattr(weights_enum, member):
            raise WeightsError(f"{src}: no such torchvision weights (e.g. ResNet50_Weights.IMAGENET1K_V1)")
        obj = getattr(weights_enum, member).get_state_dict(progress=True)
    else:
        obj = _read_object(src)
    return _state_dict_of(obj, src), table


def _is_detr_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("transformer.", "class_embed.", "backbone.0.body.")) for k in sd)


def _is_resnet_layout(sd: Mapping[str, Tensor]) -> bool:
    return "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd)


# Residual blocks of layer1..layer3 (enough to tell them apart; layer4 is absent with 3 stages)
# and whether the blocks are bottlenecks (conv3): the backbone of a DETR state dict.
RESNET_BLOCKS = {
    ((2, 2, 2), False): "resnet18",
    ((3, 4, 6), False): "resnet34",
    ((3, 4, 6), True): "resnet50",
    ((3, 4, 23), True): "resnet101",
}
# The reference repository's default number of attention heads, used by every published model.
# Weights cannot tell it (the attention projections have the same shape for any head count).
REFERENCE_NHEADS = 8
# The published non-DC5 files, e.g. detr-r50-e632da11.pth, detr-r101-2c7b67e5.pth.
PUBLISHED_NAME = re.compile(r"detr-r(50|101)-[0-9a-f]{8}\.pth", re.IGNORECASE)


def infer_model_config(
    sd: Mapping[str, Tensor], *, args: Mapping | None = None, name: str = "", given: Mapping | None = None
) -> dict:
    """The DETRConfig fields (num_classes aside) of the model a DETR state dict in the reference
    layout was trained as, so that it can be rebuilt and scored.

    From the tensors: backbone (ResNet block counts), backbone_stages, frozen_bn (no BatchNorm
    step counters), hidden_dim and num_queries (query_embed), enc_layers, dec_layers,
    dim_feedforward, pre_norm (an encoder norm exists only with pre-norm).
    Not in the tensors, so decided by, in order: `given` (the user's explicit settings), the
    reference training checkpoint's `args`, then:
      * nheads: REFERENCE_NHEADS (8), logged;
      * dilation (DC5: layer4 dilated instead of strided; same weights either way): False for
        resnet18/34 (no DC5 exists), True when the file name contains "dc5" (the published
        detr-r50-dc5-f0fb7ef5.pth, detr-r101-dc5-a2e86def.pth), False when the name is a
        published non-DC5 one (PUBLISHED_NAME); otherwise WeightsError: it would be a guess.
    `given` values win over inferred ones; the load then reports any that do not fit the tensors.
    """
    args, given = dict(args or {}), dict(given or {})
    where = name or "checkpoint"
    if not _is_detr_layout(sd) or "query_embed.weight" not in sd:
        raise WeightsError(
            f"{where}: not a DETR state dict in the reference layout (no transformer.*, query_embed.weight)"
        )
    blocks: dict[int, int] = {}
    for k in sd:
        m = re.match(r"backbone\.0\.body\.layer(\d)\.(\d+)\.", k)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    counts = tuple(blocks.get(i, 0) for i in (1, 2, 3))
    bottleneck = f"{BACKBONE_PREFIX}layer1.0.conv3.weight" in sd
    backbone = RESNET_BLOCKS.get((counts, bottleneck))
    if backbone is None:
        raise WeightsError(
            f"{where}: backbone with {counts} blocks in layer1..3 ({'bottleneck' if bottleneck else 'basic'} blocks) "
            f"is none of {', '.join(sorted(RESNET_BLOCKS.values()))}"
        )
    if args.get("backbone") not in (None, backbone):
        raise WeightsError(f"{where}: its args say backbone {args['backbone']!r} but its tensors are a {backbone}")

    def count(prefix: str) -> int:
        found = {int(m[1]) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(found) + 1 if found else 0

    out = {
        "backbone": backbone,
        "backbone_stages": 4 if 4 in blocks else 3,
        "frozen_bn": not any(k.startswith("backbone.") and k.endswith("num_batches_tracked") for k in sd),
        "hidden_dim": int(sd["query_embed.weight"].shape[1]),
        "num_queries": int(sd["query_embed.weight"].shape[0]),
        "enc_layers": count("transformer.encoder.layers."),
        "dec_layers": count("transformer.decoder.layers."),
        "pre_norm": "transformer.encoder.norm.weight" in sd,
    }
    ffn = [v for k, v in sd.items() if re.fullmatch(r"transformer\.(en|de)coder\.layers\.0\.linear1\.weight", k)]
    if ffn:
        out["dim_feedforward"] = int(ffn[0].shape[0])
    if "nheads" in given or "nheads" in args:
        out["nheads"] = int(given.get("nheads", args.get("nheads")))
    else:
        out["nheads"] = REFERENCE_NHEADS
        log.info(
            "%s: nheads is not stored in the weights; using the reference's %d (every published DETR's)",
            where,
            REFERENCE_NHEADS,
        )
    if "dilation" in given:
        out["dilation"] = bool(given["dilation"])
    elif "dilation" in args:
        out["dilation"] = bool(args["dilation"])
    elif backbone in ("resnet18", "resnet34") or out["backbone_stages"] == 3:
        out["dilation"] = False
    elif "dc5" in name.lower():
        out["dilation"] = True
    elif PUBLISHED_NAME.fullmatch(name):
        if PUBLISHED_NAME.fullmatch(name)[1] != backbone.removeprefix("resnet"):
            raise WeightsError(
                f"{where}: the name says R{PUBLISHED_NAME.fullmatch(name)[1]} but its tensors are a {backbone}"
            )
        out["dilation"] = False
    else:
        raise WeightsError(
            f"{where}: cannot tell whether this {backbone} DETR is a DC5 model (layer4 dilated; the weights are "
            "the same either way) from its name or an 'args' entry; say which with model.dilation=true or "
            "model.dilation=false (scripts/evaluate.py --set model.dilation=...)"
        )
    if "dropout" in args:
        out["dropout"] = float(args["dropout"])
    out.update(given)
    return out


def _reset(module: nn.Module) -> None:
    """Fresh default initialisation of a head (nn.Linear / nn.Conv2d / nn.Embedding / MLP)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            m.reset_parameters()


def load_pretrained(
    model: nn.Module,
    source: str | Path,
    *,
    include_backbone: bool = True,
    categories: Sequence[tuple[int, str]] | None = None,
) -> LoadReport:
    """Loads `source` into `model` in place and returns what was loaded, skipped, re-initialised.

    `model` is a detr_ray DETR (possibly wrapped in DDP). With source "torchvision", the ImageNet
    weights of the model's own backbone are downloaded through torchvision (online only).
    `categories`: the dataset's (category id, name) of each label 0..K-1; with it, a DETR source
    whose class head rows are known categories (COCO-id head, detr-ray checkpoint) has its class
    head mapped by category (module docstring). Without it, or for a head of unknown rows, the
    class head loads when its shape fits and is re-initialised otherwise.
    """
    inner = getattr(model, "module", model)
    if str(source) == "torchvision":
        source = f"torchvision:{IMAGENET_WEIGHTS[inner.cfg.backbone]}"
    sd, table = _read_source(source)
    target = inner.state_dict()
    if _is_resnet_layout(sd) and not _is_detr_layout(sd):
        report = _load_backbone(inner, sd, target, str(source))
    elif _is_detr_layout(sd):
        report = LoadReport(str(source), "detr")
        if categories is not None:
            sd = _map_class_head(inner, sd, target, table, list(categories), report)
        report = _load_detr(inner, sd, target, str(source), include_backbone, report)
    else:
        raise WeightsError(
            f"{source}: neither a DETR state dict (transformer.*, class_embed.*) nor a ResNet one "
            f"(conv1.weight, layer1.*); first keys: {list(sd)[:5]}"
        )
    for key, why in report.skipped.items():
        log.info("%s: skipped %s (%s)", source, key, why)
    for name, why in report.reinitialized.items():
        log.warning("%s: re-initialised %s (%s)", source, name, why)
    log_class_mapping(source, report)
    return report


def log_class_mapping(source, report) -> None:
    """One log line per class whose head row was taken by name or is new, then the summary."""
    for m in report.mapped_by_name + report.new_classes:
        log.info(
            "%s: class %d %r (id %d) %s",
            source,
            m.label,
            m.name,
            m.category_id,
            f"takes the row of {m.source_name!r}" if m.how == "name" else "is new: freshly initialised",
        )
    log.info("%s", report.summary())


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
    wrong = [
        f"{k}: source {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if v.shape != target[k].shape
    ]
    if wrong:
        raise WeightsError(f"{source}: shape mismatch in {len(wrong)} tensors: " + "; ".join(wrong[:5]))


def _norm(name: str) -> str:
    return "".join(name.split()).casefold()


def _source_classes(sd, table, source) -> dict[int, tuple[int, str]] | None:
    """Source class head row -> (category id, name), no-object excluded; None when unknown."""
    rows = sd["class_embed.bias"].shape[0]
    if table is not None:
        if len(table) + 1 != rows:
            raise WeightsError(
                f"{source}: its category table has {len(table)} categories but its class head "
                f"{rows} rows (expected categories + no-object)"
            )
        return dict(enumerate(table))
    if rows == COCO_ID_HEAD_ROWS:
        return {cid: (cid, name) for cid, name in COCO_CATEGORIES.items()}
    return None


def _match_classes(categories: list[tuple[int, str]], rows: dict[int, tuple[int, str]]) -> list[ClassMatch]:
    by_id = {cid: (row, name) for row, (cid, name) in rows.items()}
    by_name: dict[str, list[int]] = {}
    for row, (_, name) in rows.items():
        by_name.setdefault(_norm(name), []).append(row)
    matches = []
    for label, (cid, name) in enumerate(categories):
        # An id alone is not trusted: datasets number their categories freely, so the id must
        # also carry the same name to mean the same category.
        row, src_name = by_id.get(cid, (None, ""))
        if row is not None and _norm(src_name) == _norm(name):
            matches.append(ClassMatch(label, cid, name, "id", row, src_name))
            continue
        named = by_name.get(_norm(name), [])
        if len(named) == 1:
            matches.append(ClassMatch(label, cid, name, "name", named[0], rows[named[0]][1]))
        else:  # unknown, or a name the source gives several rows: no row is the right one
            matches.append(ClassMatch(label, cid, name, "new"))
    return matches


def _map_class_head(model, sd, target, table, categories, report) -> dict[str, Tensor]:
    """`sd` with its class head replaced by one of the model's shape, mapped by category."""
    k = target["class_embed.bias"].shape[0] - 1
    if len(categories) != k:
        raise WeightsError(f"{report.source}: {len(categories)} dataset categories given for a model with {k} classes")
    if "class_embed.weight" not in sd or "class_embed.bias" not in sd:
        return sd
    src_w, src_b = sd["class_embed.weight"], sd["class_embed.bias"]
    rows = _source_classes(sd, table, report.source)
    if rows is None:
        log.info("%s: its class head's rows are not known categories; not mapped by category", report.source)
        return sd
    if src_w.shape[1] != target["class_embed.weight"].shape[1]:
        return sd  # another hidden_dim: _load_detr reports the architecture mismatch
    report.classes = _match_classes(categories, rows)
    _reset(model.class_embed)  # new classes keep DETR's own initialisation
    w = model.class_embed.weight.detach().clone()
    b = model.class_embed.bias.detach().clone()
    for m in report.classes:
        if m.source_row is not None:
            w[m.label], b[m.label] = src_w[m.source_row], src_b[m.source_row]
    w[-1], b[-1] = src_w[-1], src_b[-1]  # no-object
    return {**sd, "class_embed.weight": w, "class_embed.bias": b}


def _load_detr(model, sd, target, source, include_backbone, report) -> LoadReport:
    sd = dict(sd)
    not_loaded = set()  # model keys that keep the model's own values
    # BatchNorm step counters say nothing about whether a backbone fits: a trainable-BatchNorm
    # source (frozen_bn=False) has them, a FrozenBatchNorm2d model keeps none.
    for k in [k for k in sd if k.endswith("num_batches_tracked") and k not in target]:
        report.skipped[k] = "BatchNorm step counter; FrozenBatchNorm2d keeps none"
        del sd[k]
    own_bb = {k for k in target if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    src_bb = {k for k in sd if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
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
        for k in [k for k in sd if k.startswith("backbone.")]:
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
