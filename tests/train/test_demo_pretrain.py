"""The demo model pre-trained on part of the demo's categories: its checkpoint, its class-head
mapping when fine-tuning on all categories, and its cache (one tiny real Ray Train run)."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from detr_ray import checkpoint as ckpt
from detr_ray.config import ConfigError, DETRConfig, apply_overrides
from detr_ray.data import demo
from detr_ray.data.shards import read_meta, read_shard_table
from detr_ray.model import build_model, load_pretrained
from detr_ray.ownership import MARKER, NotOwnedError
from detr_ray.train.demo_pretrain import (
    LOCK_FILE,
    ensure_demo_pretrained,
    pretrain_experiment,
    recipe,
    subset_annotations,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "pretrain_demo.py"
ALL_CATEGORIES = [(c["id"], c["name"]) for c in demo.CATEGORIES]
SMALL_SOURCE = {"num_train": 24, "num_val": 8}
TINY = [
    "model.hidden_dim=32",
    "model.dim_feedforward=64",
    "model.num_queries=5",
    "data.batch_size=4",
    "data.shuffle_buffer=8",
    "train.max_steps_per_epoch=2",
    "train.max_failures=0",
]


def tiny_experiment(epochs=1):
    """The experiment the script builds from `--epochs {epochs}` and the TINY --set values."""
    return apply_overrides(pretrain_experiment(epochs), TINY)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """scripts/pretrain_demo.py run for real (its own local Ray, one tiny epoch)."""
    root = tmp_path_factory.mktemp("pretrained")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    args = ["--root", str(root), "--epochs", "1", "--num-train", "24", "--num-val", "8", "--num-cpus", "2"]
    args += [a for item in TINY for a in ("--set", item)]
    run = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    path = str(root / "checkpoint")
    assert "pre-trained demo model" in run.stdout and f"--pretrained {path}" in run.stdout, run.stdout
    return root, path


@pytest.mark.timeout(240)
def test_checkpoint_is_a_detr_ray_checkpoint_of_the_subset(pretrained):
    root, path = pretrained
    loaded = ckpt.load(path)  # verifies the manifest and every file's hash
    assert loaded.state.categories == {"label_to_category_id": [1, 2], "names": ["rectangle", "triangle"]}
    assert loaded.model["class_embed.bias"].shape == (3,)  # two categories + no-object
    assert loaded.state.epoch == 1 and "val/AP" in loaded.state.metrics
    for split in ("train", "val"):
        shards = root / "subset" / split
        assert read_meta(str(shards)).label_to_category_id == [1, 2]
        ids = read_shard_table(str(shards), ["category_ids"]).column("category_ids").to_pylist()
        assert ids and all(c in (1, 2) for objects in ids for c in objects)  # no ellipse anywhere
    assert json.loads((root / "recipe.json").read_text()) == recipe(experiment=tiny_experiment(), source=SMALL_SOURCE)


@pytest.mark.timeout(60)
def test_fine_tuning_on_all_categories_maps_the_subset_by_id_and_the_rest_as_new(pretrained):
    _, path = pretrained
    source = ckpt.load(path).model
    cfg = replace(DETRConfig(**tiny_experiment()["model"]), num_classes=3)
    model = build_model(cfg)
    report = load_pretrained(model, path, categories=ALL_CATEGORIES)
    assert [(m.name, m.source_row) for m in report.mapped_by_id] == [("rectangle", 0), ("triangle", 1)]
    assert [m.name for m in report.new_classes] == ["ellipse"] and not report.mapped_by_name
    assert "2 by id (rectangle, triangle), 0 by name, 1 new (ellipse)" in report.summary()
    w, b = model.class_embed.weight.detach(), model.class_embed.bias.detach()
    assert torch.equal(w[:2], source["class_embed.weight"][:2]) and torch.equal(b[:2], source["class_embed.bias"][:2])
    assert torch.equal(w[3], source["class_embed.weight"][2])  # no-object stays no-object
    assert not torch.equal(w[2], source["class_embed.weight"][2])  # ellipse: freshly initialised
    own = model.state_dict()
    for key in (
        "transformer.decoder.norm.weight",
        "backbone.0.body.layer1.0.conv1.weight",
        "backbone.0.body.bn1.running_mean",
    ):
        assert torch.equal(own[key], source[key]), key
    assert not report.reinitialized and not any(k.startswith("backbone.") for k in report.skipped)


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_a_trainable_batchnorm_checkpoint_loads_its_backbone(tmp_path, frozen_bn):
    """A detr-ray checkpoint of a trainable-BatchNorm model (the demo's) carries BatchNorm step
    counters; the backbone still loads, into a trainable- or a frozen-BatchNorm model."""
    cfg = DETRConfig(**{**tiny_experiment()["model"], "num_classes": 2})
    torch.manual_seed(0)
    source = build_model(cfg)
    with torch.no_grad():
        for p in source.backbone.parameters():
            p.add_(0.5)
    state = ckpt.TrainingState(
        epoch=1,
        global_step=1,
        config={},
        categories={"label_to_category_id": [1, 2], "names": ["rectangle", "triangle"]},
    )
    ckpt.save(tmp_path / "ckpt", source, None, None, None, state)
    model = build_model(replace(cfg, num_classes=3, frozen_bn=frozen_bn))
    report = load_pretrained(model, tmp_path / "ckpt", categories=ALL_CATEGORIES)
    src, own = source.state_dict(), model.state_dict()
    backbone = [k for k in own if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    assert backbone and all(torch.equal(own[k], src[k]) for k in backbone)
    assert set(backbone) <= set(report.loaded)
    assert [m.name for m in report.new_classes] == ["ellipse"]


@pytest.mark.timeout(60)
def test_second_call_reuses_the_cache_and_a_rebuild_refuses_foreign_files(pretrained):
    root, path = pretrained
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    # Ray is not running: a rebuild would have to start a Train run; the cache answers instead.
    assert ensure_demo_pretrained(root, experiment=tiny_experiment(), source=SMALL_SOURCE) == path
    assert {p: p.stat().st_mtime_ns for p in files} == files

    foreign = root / "checkpoint" / "notes.txt"
    foreign.write_text("mine")
    try:  # another recipe (two epochs) must rebuild, which would delete notes.txt: refused first
        with pytest.raises(NotOwnedError, match="notes.txt"):
            ensure_demo_pretrained(root, experiment=tiny_experiment(epochs=2), source=SMALL_SOURCE)
        assert foreign.read_text() == "mine"
        ckpt.verify(path)  # nothing of the cache was removed either
        assert {p: p.stat().st_mtime_ns for p in files} == files
    finally:
        foreign.unlink()


def test_a_root_holding_other_files_is_refused_untouched(tmp_path):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(NotOwnedError, match="data.csv"):
        ensure_demo_pretrained(tmp_path, experiment=tiny_experiment(), source=SMALL_SOURCE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]
    assert not (tmp_path / MARKER).exists()


def test_the_recipe_changes_with_categories_epochs_source_and_model():
    base = recipe(experiment=tiny_experiment(), source=SMALL_SOURCE)
    assert base == recipe(experiment=tiny_experiment(), source=dict(SMALL_SOURCE))
    assert base["categories"] == [1, 2]
    other_model = tiny_experiment()
    other_model["model"]["hidden_dim"] = 64
    for changed in (
        recipe(categories=(1, 3), experiment=tiny_experiment(), source=SMALL_SOURCE),
        recipe(experiment=tiny_experiment(epochs=2), source=SMALL_SOURCE),
        recipe(experiment=tiny_experiment(), source={**SMALL_SOURCE, "seed": 2}),
        recipe(experiment=other_model, source=SMALL_SOURCE),
    ):
        assert changed != base
    with pytest.raises(ValueError, match="demo category ids"):
        recipe(categories=(1, 4))
    bad = copy.deepcopy(tiny_experiment())
    bad["train"]["epocs"] = 3
    with pytest.raises(ConfigError, match="epocs"):
        recipe(experiment=bad)


def test_subset_keeps_only_images_whose_objects_all_belong_to_it():
    coco = {
        "images": [{"id": i} for i in (1, 2, 3, 4)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1},
            {"id": 2, "image_id": 2, "category_id": 1},
            {"id": 3, "image_id": 2, "category_id": 3},
            {"id": 4, "image_id": 3, "category_id": 2},
        ],
        "categories": demo.CATEGORIES,
    }
    part = subset_annotations(coco, [1, 2])
    assert [im["id"] for im in part["images"]] == [1, 3, 4]  # 2 holds an ellipse; 4 is empty
    assert [a["id"] for a in part["annotations"]] == [1, 4]
    assert [c["name"] for c in part["categories"]] == ["rectangle", "triangle"]


def test_script_categories_by_name_or_id():
    from detr_ray.cli.pretrain_demo import parse_categories

    assert parse_categories("rectangle, triangle") == [1, 2]
    assert parse_categories("3,1") == [3, 1]
    with pytest.raises(ConfigError, match="'circle'"):
        parse_categories("circle")
