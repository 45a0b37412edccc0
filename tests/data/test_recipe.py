"""data.augment "auto": the recipe follows the shards themselves (their _meta.json), so the demo
data gets the demo's scales however it is reached, and other data DETR's COCO scales."""

import importlib.util
from pathlib import Path

import pytest

from detr_ray.config import ConfigError, DataConfig, from_dict
from detr_ray.data.recipe import TransformConfig, augment_recipe
from tests.data.conftest import make_shards

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_coco.py"


def _prepare_coco():
    spec = importlib.util.spec_from_file_location("prepare_coco", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_prepared_into_a_directory_trains_with_the_demo_recipe(tmp_path):
    out = tmp_path / "demo"
    assert _prepare_coco().main(["--demo", "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    given = from_dict(DataConfig, {"train": str(out / "train"), "val": str(out / "val")})  # train.py --data DIR
    assert augment_recipe(given) == TransformConfig.demo()
    assert augment_recipe(from_dict(DataConfig, {})) == TransformConfig.demo()  # the default demo location
    assert augment_recipe(from_dict(DataConfig, {**vars(given), "augment": "coco"})) == TransformConfig.coco()


def test_other_shards_train_at_coco_scales(tmp_path):
    shards, _ = make_shards(tmp_path, corrupt=False)
    cfg = from_dict(DataConfig, {"train": str(shards), "val": str(shards)})
    assert augment_recipe(cfg) == TransformConfig.coco()
    assert augment_recipe(from_dict(DataConfig, {**vars(cfg), "augment": "demo"})) == TransformConfig.demo()
    with pytest.raises(ConfigError, match="data.augment"):
        from_dict(DataConfig, {"augment": "big"}, "data")
