"""Which augmentation recipe a run's data gets: `data.augment` ("demo", "coco" or "auto").

"auto" is decided by the shards themselves: their `_meta.json` records whether the demo
generator wrote them (`extra["demo"]`), so the demo data gets the demo's small scales however
it is reached (the default demo location, `data.demo_root`, or `--data DIR` after
`prepare_coco.py --demo --out DIR`), and any other data DETR's COCO scales.
"""

from __future__ import annotations

import logging

from detr_ray.config import DataConfig
from detr_ray.data.shards import ShardError, read_meta
from detr_ray.data.transforms import TransformConfig

log = logging.getLogger(__name__)


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
