"""Typed configuration dataclasses and their loading from plain dicts / YAML.

Every config is a frozen-free dataclass with defaults; `from_dict` builds one from a mapping and
rejects unknown keys and wrongly typed values with an error that names the source and the key.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

log = logging.getLogger(__name__)
T = TypeVar("T")

RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# model.arch: DETR (ours) or a torchvision detector, built by detr_ray/model/detectors.py.
DETECTOR_ARCHS = (
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet101_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "retinanet_resnet101_fpn",
    "fcos_resnet50_fpn",
    "fcos_resnet101_fpn",
)
ARCHS = ("detr", *DETECTOR_ARCHS)
# Settings only DETR reads; a torchvision detector (model.arch) ignores them, and its run logs which.
DETR_ONLY_SETTINGS = {
    "model": (
        "backbone",
        "dilation",
        "backbone_stages",
        "hidden_dim",
        "nheads",
        "enc_layers",
        "dec_layers",
        "dim_feedforward",
        "dropout",
        "num_queries",
        "aux_loss",
        "pre_norm",
        "train_backbone",
        "frozen_bn",
    ),
    "train": ("eos_coef", "cost_class", "cost_bbox", "cost_giou", "calibrate_frozen_bn"),
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message names where and which."""


@dataclass
class DETRConfig:
    """DETR architecture. Defaults are the paper's (Carion et al., 2020).

    `num_classes` counts the dataset's classes; the class head has num_classes + 1 outputs, the
    last one being "no object". COCO checkpoints use num_classes=91 (max category id + 1).

    `arch` other than "detr" picks a torchvision detector (DETECTOR_ARCHS), which reads only
    num_classes of this section (DETR_ONLY_SETTINGS lists what it ignores).
    """

    arch: str = "detr"
    backbone: str = "resnet50"
    dilation: bool = False  # DC5: dilate the last ResNet stage instead of striding it
    # ResNet stages used: 4 (DETR: features of layer4, stride 32) or 3 (features of layer3, stride
    # 16, no layer4: a quarter fewer FLOPs and, for resnet18, three quarters fewer parameters;
    # for small images, where stride 32 leaves only a few tokens).
    backbone_stages: int = 4
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 91
    aux_loss: bool = True
    pre_norm: bool = False
    train_backbone: bool = True  # False freezes the whole backbone (lr_backbone = 0)
    # DETR's backbone uses frozen BatchNorm (statistics from ImageNet pre-training). Training from
    # scratch (the demo, where nothing can be downloaded) learns far faster with ordinary,
    # trainable BatchNorm and the whole backbone trainable: frozen_bn=False.
    frozen_bn: bool = True

    def validate(self, where: str = "model") -> "DETRConfig":
        if self.arch not in ARCHS:
            raise ConfigError(f"{where}.arch: unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.backbone not in RESNET_BACKBONES:
            raise ConfigError(
                f"{where}.backbone: unknown backbone {self.backbone!r}; choose one of {', '.join(RESNET_BACKBONES)}"
            )
        if self.backbone_stages not in (3, 4):
            raise ConfigError(f"{where}.backbone_stages: must be 3 or 4, got {self.backbone_stages}")
        if self.dilation and self.backbone_stages != 4:
            raise ConfigError(
                f"{where}.dilation: DC5 dilates layer4, which backbone_stages={self.backbone_stages} leaves out"
            )
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ConfigError(f"{where}.dilation: DC5 needs a bottleneck ResNet (resnet50/101), not {self.backbone}")
        for name in ("hidden_dim", "nheads", "dim_feedforward", "num_queries", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0 or self.dec_layers < 1:
            raise ConfigError(
                f"{where}: need enc_layers >= 0 and dec_layers >= 1, got {self.enc_layers} and {self.dec_layers}"
            )
        if self.hidden_dim % self.nheads:
            raise ConfigError(f"{where}.hidden_dim: {self.hidden_dim} is not divisible by nheads={self.nheads}")
        if self.hidden_dim % 2:
            raise ConfigError(f"{where}.hidden_dim: must be even (sine embedding), got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        return self


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Checks (and for int->float, converts) one scalar field value against its annotation."""
    if annotation in (float, "float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation in (bool, "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation in (str, "str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Builds dataclass `cls` from `data`; unknown keys and bad types raise ConfigError naming
    `where.key`. Nested dataclass fields are built recursively."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = _renamed_keys(cls, dict(data or {}), where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(where)
    return obj


def _renamed_keys(cls: type, data: dict, where: str) -> dict:
    """`data` with the old names of renamed keys (cls.RENAMED) replaced by the new ones, each with
    a warning; both names at once is an error."""
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old not in data:
            continue
        if new in data:
            raise ConfigError(f"{where}: {old} is the old name of {new}; give only {new}")
        log.warning("%s.%s is now called %s.%s; reading it as that (rename it)", where, old, where, new)
        data[new] = data.pop(old)
    return data


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping; malformed YAML or a non-mapping top level names the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


@dataclass
class DataConfig:
    """Where the data is and how it is fed. Empty `train`/`val` mean the synthetic demo dataset
    (generated under `demo_root`, default: demo.default_demo_root()).

    `augment`: "auto" (the demo's small scales when the shards are the demo's, as their meta
    says, DETR's COCO scales otherwise: data/recipe.py), "coco" or "demo".
    `batch_size` is per Train worker; `shuffle_buffer` rows are mixed locally on each worker
    (0: no local shuffle). `group_shapes`: a batch is made of images of one orientation and
    similar size (see collate.shape_group), which cuts the padding the model computes on.
    `decode_num_cpus` is the CPU reservation of one decode task; `ray_data_cpus` caps the CPUs
    this run's Ray Data tasks hold at once (0: `decode_num_cpus` per Train worker), so that runs
    sharing a cluster never starve each other's decoding."""

    # Old key -> new key. Configs written with an old key (stored checkpoints, run and sweep
    # records, YAMLs) are still read, with a warning naming the new key.
    RENAMED: typing.ClassVar[dict[str, str]] = {"cpus": "ray_data_cpus"}

    train: str = ""
    val: str = ""
    demo_root: str = ""
    augment: str = "auto"
    batch_size: int = 4
    shuffle_buffer: int = 64
    group_shapes: bool = True
    decode_batch_size: int = 16
    decode_num_cpus: float = 1.0
    ray_data_cpus: float = 0.0
    prefetch_batches: int = 2

    def validate(self, where: str = "data") -> "DataConfig":
        if self.augment not in ("auto", "coco", "demo"):
            raise ConfigError(f"{where}.augment: choose auto, coco or demo, got {self.augment!r}")
        for name in ("batch_size", "decode_batch_size", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"{where}.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.decode_num_cpus <= 0:
            raise ConfigError(f"{where}.decode_num_cpus: must be > 0, got {self.decode_num_cpus}")
        if self.ray_data_cpus < 0:
            raise ConfigError(f"{where}.ray_data_cpus: must be >= 0, got {self.ray_data_cpus}")
        if self.ray_data_cpus and self.ray_data_cpus < self.decode_num_cpus:
            raise ConfigError(
                f"{where}.ray_data_cpus: {self.ray_data_cpus} is below one decode task's decode_num_cpus "
                f"({self.decode_num_cpus}); "
                "no decode task could ever run"
            )
        if bool(self.train) != bool(self.val):
            raise ConfigError(f"{where}: give both train and val shard locations, or neither (demo)")
        return self

    @property
    def uses_demo(self) -> bool:
        return not self.train


PRECISION_CHOICES = ("auto", "fp32", "tf32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimisation, schedule, resources and bookkeeping of one training run.

    Defaults are DETR's (AdamW lr 1e-4, backbone 1e-5, weight decay 1e-4, clip 0.1, x0.1 drop at
    `lr_drop`); `precision: auto` is bf16 on GPUs that support it and fp32 elsewhere."""

    epochs: int = 50
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_schedule: str = "step"  # step (x0.1 at lr_drop) | cosine (after warmup_epochs)
    lr_drop: int = 200
    warmup_epochs: int = 0
    clip_max_norm: float = 0.1
    eos_coef: float = 0.1
    cost_class: float = 1.0  # matcher costs; the loss weights of L1 and GIoU are the same numbers
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    precision: str = "auto"
    channels_last: bool = False
    eval_every: int = 1
    seed: int = 0
    pretrained: str = ""  # DETR checkpoint or ImageNet backbone (file, URL, "torchvision")
    pretrained_backbone: str = ""  # loaded after `pretrained`, e.g. ImageNet R101 after R50 DETR
    calibrate_frozen_bn: bool = True  # without a pretrained backbone only
    num_workers: int = 1
    gpus_per_worker: float = 0.0  # 0: CPU training (gloo); fractions allowed for small models
    cpus_per_worker: float = 1.0
    keep_checkpoints: int = 2  # best k by val/AP (the latest is always kept too)
    max_failures: int = 2  # worker-group restarts before the run fails
    check_finite_every: int = 20  # steps between non-finite checks on GPU (every step on CPU)
    max_steps_per_epoch: int = 0  # 0: whole epochs
    tensorboard: bool = True
    tensorboard_images: int = 4

    def validate(self, where: str = "train") -> "TrainConfig":
        if self.lr_schedule not in ("step", "cosine"):
            raise ConfigError(f"{where}.lr_schedule: choose step or cosine, got {self.lr_schedule!r}")
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"{where}.precision: choose one of {PRECISION_CHOICES}, got {self.precision!r}")
        for name in ("epochs", "eval_every", "num_workers", "keep_checkpoints", "check_finite_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "cpus_per_worker"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: must be > 0, got {getattr(self, name)}")
        for name in (
            "lr_backbone",
            "weight_decay",
            "clip_max_norm",
            "gpus_per_worker",
            "warmup_epochs",
            "max_steps_per_epoch",
            "max_failures",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr_drop < 1:
            raise ConfigError(f"{where}.lr_drop: must be >= 1, got {self.lr_drop}")
        return self


@dataclass
class ExperimentConfig:
    """Everything one training run needs: model, data, training. YAML layout:
    `model: {...}`, `data: {...}`, `train: {...}`."""

    model: DETRConfig
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": to_dict(self.model), "data": to_dict(self.data), "train": to_dict(self.train)}


def experiment_from_dict(data: Mapping[str, Any] | None, where: str = "config") -> ExperimentConfig:
    """Builds an ExperimentConfig; unknown sections or keys are errors naming `where.section.key`."""
    data = dict(data or {})
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; known: model, data, train")
    exp = ExperimentConfig(
        model=from_dict(DETRConfig, data.get("model"), f"{where}.model"),
        data=from_dict(DataConfig, data.get("data"), f"{where}.data"),
        train=from_dict(TrainConfig, data.get("train"), f"{where}.train"),
    )
    if exp.model.arch != "detr" and exp.train.pretrained_backbone:
        # A weights source is never silently dropped: refused, not ignored.
        raise ConfigError(
            f"{where}.train.pretrained_backbone: loads ImageNet weights into DETR's backbone; model.arch="
            f"{exp.model.arch} takes whole-detector weights through train.pretrained only"
        )
    return exp


def apply_overrides(data: dict, overrides: list[str], where: str = "--set") -> dict:
    """Applies `section.key=value` strings (value parsed as YAML) to a nested config dict."""
    data = {k: dict(v or {}) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"{where} {item!r}: expected section.key=value, e.g. train.lr=2e-4")
        data.setdefault(section, {})[name] = yaml.safe_load(raw)
    return data


def bundled_search_space(name: str) -> Path:
    """A search space shipped with detr-ray (search_spaces/<name>): the repository's file in a
    checkout, where a user edits it; the copy installed as package data
    (`detr_ray/search_spaces/`, see pyproject.toml) after a plain `pip install .`."""
    checkout = Path(__file__).resolve().parents[1] / "search_spaces" / name
    if checkout.is_file():
        return checkout
    installed = Path(__file__).resolve().parent / "search_spaces" / name
    if installed.is_file():
        return installed
    raise ConfigError(
        f"{name}: not among the search spaces shipped with detr-ray (looked in {checkout} and {installed})"
    )
