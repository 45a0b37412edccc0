"""A demo DETR pre-trained on part of the demo's categories: the transfer story, runnable on a laptop.

Published DETR weights cannot be used on the embedded demo, so the demo makes its own "source
model": the demo experiment's model trained on demo images that hold only some of the demo's
categories (by default rectangle and triangle; ellipse is left out). Fine-tuning that model on
the whole demo (`scripts/train.py --pretrained <checkpoint>`) maps its class head by category
(`weights.load_pretrained`): the shared categories by id, the left-out ones freshly initialised.

`ensure_demo_pretrained(root)` builds, once, under `root` (default: default_pretrained_root()):

    root/source/                 demo images of another seed than the demo's (demo.ensure_demo_shards)
    root/subset/annotations/     their COCO annotations restricted to the subset: the images whose
                                 objects all belong to it, with the subset's category table
    root/subset/train, val/      Parquet shards of those (shards.write_shards), own _meta.json
    root/checkpoint/             the pre-trained model: a detr-ray checkpoint (detr_ray/checkpoint.py)
                                 carrying the subset's category table; optimizer state left out
    root/recipe.json             written last: what the checkpoint was made from (`recipe`)
    root/.detr-ray-owner         marks root as made by this module (ownership.MARKER)

A later call with the same recipe returns the cached checkpoint once it verifies. Another recipe
(other categories, source data, experiment, or a new DEMO_PRETRAIN_VERSION) rebuilds: only in a
root this module marked, and only when every file under subset/ and checkpoint/ is one it writes;
anything else is a NotOwnedError naming it and nothing is removed. root/source follows the demo
generator's own rules. The Ray Train run itself lives in a temporary directory, removed after.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from detr_ray import checkpoint as ckpt
from detr_ray.config import experiment_from_dict
from detr_ray.data import demo
from detr_ray.data.coco import load_coco
from detr_ray.data.shards import write_shards
from detr_ray.ownership import claim, remove_generated
from detr_ray.train.trainer import demo_experiment

logger = logging.getLogger(__name__)

DEMO_PRETRAIN_VERSION = 1
OWNER = "detr_ray.train.demo_pretrain"
LOCK_FILE = ".detr-ray-demo-pretrain.lock"
RECIPE_FILE = "recipe.json"
DEFAULT_CATEGORIES = (1, 2)  # rectangle, triangle: ellipse is the category the fine-tuning adds
# Another seed than the demo's (0): pre-training sees other images than the demo's train/val.
SOURCE = {"num_train": 600, "num_val": 150, "seed": 1, "image_sizes": (64, 96), "shard_size": 64}
# The demo experiment (scripts/train.py's default), so its --pretrained loads every tensor; the
# data is the subset's shards (set by `ensure_demo_pretrained`), augmented as the demo is.
PRETRAIN_EPOCHS = 6
# Every path (relative to root) this module writes outside source/, for the check before a rebuild.
_GENERATED = re.compile(
    r"subset(/annotations(/instances_(train|val)\.json(\.tmp)?)?"
    r"|/(train|val)(/(part-\d{5}-of-\d{5}-[0-9a-f]{10}\.parquet|_meta\.json)(\.[0-9a-f]{8}\.tmp)?)?)?"
    r"|checkpoint(/((model|optimizer|scheduler|scaler)\.pt|state\.json|MANIFEST\.json)(\.tmp)?)?"
    r"|recipe\.json(\.tmp)?"
)


def default_pretrained_root() -> str:
    """$DETR_RAY_DEMO_PRETRAINED_DIR, else ~/.cache/detr_ray/demo-pretrained-v<version>."""
    return os.environ.get("DETR_RAY_DEMO_PRETRAINED_DIR") or str(
        Path.home() / ".cache" / "detr_ray" / f"demo-pretrained-v{DEMO_PRETRAIN_VERSION}"
    )


def pretrain_experiment(epochs: int = PRETRAIN_EPOCHS) -> dict[str, Any]:
    """The default pre-training experiment: the demo experiment's model and optimiser settings,
    with a cosine schedule (a short run gains most from annealing to its end)."""
    exp = demo_experiment()
    exp["data"].update(augment="demo")
    exp["train"].update(epochs=epochs, lr_schedule="cosine", keep_checkpoints=1, tensorboard=False)
    return exp


def recipe(
    categories: Sequence[int] = DEFAULT_CATEGORIES,
    experiment: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the cached checkpoint depends on; any change makes `ensure_demo_pretrained`
    build it again. The experiment is validated here (ConfigError naming the key)."""
    exp = copy.deepcopy(experiment if experiment is not None else pretrain_experiment())
    exp.setdefault("data", {}).update(train="", val="", demo_root="")  # set to the subset's shards
    exp = experiment_from_dict(exp, "demo pre-training experiment").to_dict()
    src = {**SOURCE, **(source or {})}
    src["image_sizes"] = [int(s) for s in src["image_sizes"]]
    known = {c["id"] for c in demo.CATEGORIES}
    unknown = sorted(set(categories) - known)
    if unknown or not categories or len(set(categories)) != len(categories):
        raise ValueError(
            f"pre-training categories {list(categories)}: give distinct demo category ids from {sorted(known)}"
        )
    return {
        "version": DEMO_PRETRAIN_VERSION,
        "demo_version": demo.DEMO_VERSION,
        "categories": sorted(int(c) for c in categories),
        "source": src,
        "experiment": exp,
    }


def subset_annotations(coco: dict[str, Any], category_ids: Sequence[int]) -> dict[str, Any]:
    """A COCO dict restricted to `category_ids`: the images whose objects all belong to them
    (empty images included), their annotations, and those categories only. An image holding any
    other category is left out entirely rather than kept with that object unlabelled, which
    would teach the model to call it background."""
    keep = set(category_ids)
    others = {a["image_id"] for a in coco["annotations"] if a["category_id"] not in keep}
    images = [im for im in coco["images"] if im["id"] not in others]
    ids = {im["id"] for im in images}
    return {
        "images": images,
        "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
        "categories": [c for c in coco["categories"] if c["id"] in keep],
    }


def write_subset_shards(source_root: Path, out: Path, category_ids: Sequence[int], shard_size: int) -> tuple[str, str]:
    """Shards of the demo data under `source_root` restricted to `category_ids` (subset_annotations),
    written under `out`; returns (train, val) shard directories."""
    result = []
    for split in ("train", "val"):
        full = json.loads((source_root / "raw" / "annotations" / f"instances_{split}.json").read_text())
        part = subset_annotations(full, category_ids)
        annotation_file = out / "annotations" / f"instances_{split}.json"
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = annotation_file.with_name(annotation_file.name + ".tmp")
        tmp.write_text(json.dumps(part))
        os.replace(tmp, annotation_file)
        shards = out / split
        report = write_shards(
            load_coco(str(annotation_file)),
            str(source_root / "raw" / split),
            str(shards),
            shard_size=shard_size,
            workers=0,
            progress=False,
        )
        logger.info(
            "demo pre-training %s split (%d of %d images):\n%s",
            split,
            len(part["images"]),
            len(full["images"]),
            report.summary(),
        )
        result.append(str(shards))
    return result[0], result[1]


def _cached(root: Path, wanted: dict[str, Any]) -> str | None:
    """root/checkpoint when recipe.json is `wanted` and the checkpoint verifies; else None."""
    try:
        stored = json.loads((root / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if stored != wanted:
        logger.info("%s: made by another recipe; building it again", root / "checkpoint")
        return None
    try:
        ckpt.verify(root / "checkpoint")
    except ckpt.CheckpointError as e:
        logger.warning("%s: the cached checkpoint does not verify (%s); building it again", root, e)
        return None
    return str(root / "checkpoint")


def _remove_generated(root: Path) -> None:
    """Deletes subset/, checkpoint/ and recipe.json under root (marked as this module's) only if
    every file there is one this module writes (ownership.remove_generated)."""
    remove_generated(
        root,
        ("subset", "checkpoint", RECIPE_FILE),
        _GENERATED,
        f"not written by the demo pre-training; refusing to rebuild the pre-trained demo model in {root}, "
        "nothing was removed. Move it away, or point DETR_RAY_DEMO_PRETRAINED_DIR at another directory.",
    )


def _train(root: Path, wanted: dict[str, Any]) -> str:
    """Trains on the subset shards with Ray Train (the caller's Ray, or a local one Ray starts) and
    writes root/checkpoint: the run's last checkpoint without its optimizer state."""
    from detr_ray.model import build_model
    from detr_ray.train.trainer import build_trainer

    src = wanted["source"]
    source_train, _ = demo.ensure_demo_shards(root / "source", **{**src, "image_sizes": tuple(src["image_sizes"])})
    train_uri, val_uri = write_subset_shards(
        Path(source_train).parent, root / "subset", wanted["categories"], src["shard_size"]
    )
    raw = copy.deepcopy(wanted["experiment"])
    raw["data"].update(train=train_uri, val=val_uri)
    exp = experiment_from_dict(raw, "demo pre-training experiment")
    storage = tempfile.mkdtemp(prefix="detr-ray-demo-pretrain-")
    try:
        logger.info("pre-training the demo model on categories %s (%d epochs)", wanted["categories"], exp.train.epochs)
        result = build_trainer(exp, name="demo-pretrain", storage_path=storage).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"demo pre-training in {storage} reported no checkpoint")
        loaded = ckpt.load(result.checkpoint.path)
        model = build_model(replace(exp.model, num_classes=len(loaded.state.categories["label_to_category_id"])))
        model.load_state_dict(loaded.model)
        ckpt.save(root / "checkpoint", model, None, None, None, loaded.state)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    tmp = root / (RECIPE_FILE + ".tmp")
    tmp.write_text(json.dumps(wanted, indent=2))
    os.replace(tmp, root / RECIPE_FILE)
    logger.info(
        "pre-trained demo model: %s (val/AP on its categories %.3f)",
        root / "checkpoint",
        loaded.state.metrics.get("val/AP", float("nan")),
    )
    return str(root / "checkpoint")


def ensure_demo_pretrained(
    root: str | os.PathLike | None = None,
    *,
    categories: Sequence[int] = DEFAULT_CATEGORIES,
    experiment: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> str:
    """The checkpoint directory of the demo model pre-trained on `categories` (demo category
    ids), built first if missing or made by another recipe (module docstring). `experiment`:
    the pre-training experiment (default `pretrain_experiment()`; its data locations are set
    here); `source`: overrides of SOURCE, the demo generator's arguments for the source images.
    Safe to call from several processes of one machine at once (a file lock)."""
    wanted = recipe(categories, experiment, source)
    root = Path(root or default_pretrained_root())
    claim(root, OWNER, ignore=(LOCK_FILE,))  # a root holding anything else: NotOwnedError, nothing written
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _cached(root, wanted)
        if found:
            logger.info("pre-trained demo model (cached): %s", found)
            return found
        _remove_generated(root)
        return _train(root, wanted)
