"""Which augmentation recipe a run's data gets: `data.augment` ("demo", "coco" or "auto").

"auto" is decided by the shards themselves: their `_meta.json` records whether the demo
generator wrote them (`extra["demo"]`), so the demo data gets the demo's small scales however
it is reached (the default demo location, `data.demo_root`, or `--data DIR` after
`prepare_coco.py --demo --out DIR`), and any other data DETR's COCO scales.

The recipe (`TransformConfig`) is plain data, apart from transforms.py, which applies it: the
processes that build or hold a dataset but decode no image (a Tune trial, Ray Train's
DatasetManager) then do not import torchvision (2-3 s of CPU per process on 2 cores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from detr_ray.config import ConfigError, DataConfig
from detr_ray.data.shards import ShardError, read_meta

log = logging.getLogger(__name__)


@dataclass
class TransformConfig:
    """Augmentation scales in pixels. Defaults are DETR's COCO recipe; `demo()` is the small
    recipe of the synthetic demo dataset."""

    train_scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    val_scale: int = 800

    def validate(self, where: str = "augment") -> "TransformConfig":
        for name in ("train_scales", "crop_resize_scales"):
            scales = tuple(getattr(self, name))
            if not scales or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in scales):
                raise ConfigError(f"{where}.{name}: expected a non-empty list of positive integers, got {scales!r}")
            setattr(self, name, scales)
        for name in ("max_size", "crop_min", "crop_max", "val_scale"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.crop_min > self.crop_max:
            raise ConfigError(f"{where}: crop_min {self.crop_min} > crop_max {self.crop_max}")
        for name in ("flip_prob", "crop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{where}.{name}: must be in [0, 1], got {getattr(self, name)}")
        return self

    @classmethod
    def coco(cls) -> "TransformConfig":
        return cls()

    @classmethod
    def demo(cls) -> "TransformConfig":
        """Scales for the synthetic demo dataset (images of 64-96 px)."""
        return cls(
            train_scales=(64, 72, 80, 88, 96),
            max_size=128,
            crop_prob=0.3,
            crop_resize_scales=(80, 96),
            crop_min=56,
            crop_max=80,
            val_scale=80,
        )


def is_demo_shards(shards_uri: str) -> bool:
    """Whether the demo generator wrote the shard directory (its `_meta.json` says so)."""
    return "demo" in read_meta(shards_uri).extra


def augment_recipe(cfg: DataConfig, train_uri: str | None = None) -> TransformConfig:
    """The recipe of `cfg.augment`; for "auto", the demo's when the train shards (`train_uri`,
    default: `cfg.train`; none configured: the demo) are the demo's, else COCO's. Shards whose
    meta cannot be read (e.g. storage no longer reachable when a checkpoint is evaluated) get
    COCO's scales, with a warning."""
    if cfg.augment == "demo":
        return TransformConfig.demo()
    if cfg.augment == "coco":
        return TransformConfig.coco()
    uri = train_uri or cfg.train
    if not uri:
        return TransformConfig.demo()
    try:
        demo = is_demo_shards(uri)
    except (ShardError, OSError) as e:
        log.warning("data.augment=auto: cannot read the meta of %s (%s); using COCO's scales", uri, e)
        demo = False
    return TransformConfig.demo() if demo else TransformConfig.coco()
