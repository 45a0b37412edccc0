import pytest
import yaml

from detr_ray.config import ConfigError, experiment_from_dict
from detr_ray.tune.space import load_space, parse_space

SPACES = sorted(__import__("pathlib").Path(__file__).resolve().parents[2].joinpath("search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_are_valid_and_build_experiments(path):
    space = load_space(path)
    domains = space.tune_domains()
    assert "train.lr" in domains and "model.backbone" in domains
    sample = {k: (v.sample() if hasattr(v, "sample") else v) for k, v in domains.items()}
    exp = experiment_from_dict(space.experiment_for(sample))
    assert exp.model.backbone == sample["model.backbone"]
    assert exp.train.lr_backbone == pytest.approx(sample["train.lr"] * sample["train.lr_backbone_ratio"])


def test_coco_space_covers_what_the_issue_asks():
    space = load_space(SPACES[0].parent / "coco_r50_r101.yaml")
    p = {x.key: x for x in space.params}
    assert p["train.lr"].kind == "loguniform" and p["train.lr"].args == [1e-5, 1e-3]
    assert p["train.weight_decay"].args == [1e-5, 1e-2]
    assert p["model.backbone"].args == ["resnet50", "resnet101"]
    assert "train.lr_backbone_ratio" in p


def _write(tmp_path, data):
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


@pytest.mark.parametrize(
    "search,needle",
    [
        ({"train.learning_rate": {"loguniform": [1e-5, 1e-3]}}, "search.train.learning_rate: unknown key"),
        ({"optimizer.lr": {"uniform": [0, 1]}}, "search.optimizer.lr: unknown key"),
        ({"train.lr": {"loguniform": [1e-3, 1e-5]}}, "search.train.lr.loguniform: lower bound"),
        ({"train.lr": {"uniform": [0.1, 0.1]}}, "search.train.lr.uniform: lower bound"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, "search.train.lr.loguniform: bounds must be positive"),
        ({"model.backbone": {"choice": ["resnet50", "vgg16"]}}, "search.model.backbone: value 'vgg16' is invalid"),
        ({"model.backbone": {"choice": "resnet50"}}, "search.model.backbone.choice: expected a non-empty list"),
        ({"model.dropout": {"uniform": [0.0, 1.5]}}, "search.model.dropout: value 1.5 is invalid"),
        ({"train.lr": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
        ({"train.epochs": {"int": [1.5, 3]}}, "search.train.epochs.int: bounds must be integers"),
    ],
)
def test_invalid_spaces_name_file_and_key(tmp_path, search, needle):
    f = _write(tmp_path, {"search": search})
    with pytest.raises(ConfigError) as e:
        load_space(f)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_unknown_top_level_and_scheduler_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*serach"):
        load_space(_write(tmp_path, {"serach": {}}))
    with pytest.raises(ConfigError, match="scheduler: unknown key.*patience"):
        load_space(_write(tmp_path, {"scheduler": {"patience": 3}}))
    with pytest.raises(ConfigError, match="scheduler.startup_trials: must be >= 1"):
        load_space(_write(tmp_path, {"scheduler": {"startup_trials": 0}}))
    with pytest.raises(ConfigError, match="experiment.model.backbone: unknown backbone"):
        parse_space({"experiment": {"model": {"backbone": "resnet152"}}})


def test_int_bounds_are_inclusive():
    space = parse_space({"search": {"train.lr_drop": {"int": [3, 4]}}})
    domain = space.tune_domains()["train.lr_drop"]
    assert {domain.sample() for _ in range(200)} == {3, 4}
