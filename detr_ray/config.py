"""Typed configuration dataclasses and their loading from plain dicts / YAML.

Every config is a frozen-free dataclass with defaults; `from_dict` builds one from a mapping and
rejects unknown keys and wrongly typed values with an error that names the source and the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message names where and which."""


@dataclass
class DETRConfig:
    """DETR architecture. Defaults are the paper's (Carion et al., 2020).

    `num_classes` counts the dataset's classes; the class head has num_classes + 1 outputs, the
    last one being "no object". COCO checkpoints use num_classes=91 (max category id + 1).
    """

    backbone: str = "resnet50"
    dilation: bool = False  # DC5: dilate the last ResNet stage instead of striding it
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

    def validate(self, where: str = "model") -> "DETRConfig":
        if self.backbone not in RESNET_BACKBONES:
            raise ConfigError(
                f"{where}.backbone: unknown backbone {self.backbone!r}; "
                f"choose one of {', '.join(RESNET_BACKBONES)}"
            )
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ConfigError(
                f"{where}.dilation: DC5 needs a bottleneck ResNet (resnet50/101), "
                f"not {self.backbone}"
            )
        for name in ("hidden_dim", "nheads", "dim_feedforward", "num_queries", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0 or self.dec_layers < 1:
            raise ConfigError(
                f"{where}: need enc_layers >= 0 and dec_layers >= 1, "
                f"got {self.enc_layers} and {self.dec_layers}"
            )
        if self.hidden_dim % self.nheads:
            raise ConfigError(
                f"{where}.hidden_dim: {self.hidden_dim} is not divisible by nheads={self.nheads}"
            )
        if self.hidden_dim % 2:
            raise ConfigError(f"{where}.hidden_dim: must be even (sine embedding), got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        return self


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Checks (and for int->float, converts) one scalar field value against its annotation."""
    if annotation in (float, "float"):
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
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
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
