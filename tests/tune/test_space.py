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


COCO_FINETUNE = SPACES[0].parent / "coco_finetune.yaml"
R50 = "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
R101 = "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth"


def test_coco_finetune_space_starts_each_trial_from_its_backbones_weights():
    space = load_space(COCO_FINETUNE)
    p = {x.key: x for x in space.params}
    assert p["model.backbone"].args == ["resnet50", "resnet101"]
    assert p["train.pretrained"].kind == "by"
    assert p["train.lr"].args == [1e-5, 1e-4] and p["train.lr"].kind == "loguniform"
    assert {"train.lr_backbone_ratio", "train.weight_decay", "train.clip_max_norm", "model.dropout"} <= set(p)
    epochs = experiment_from_dict(space.experiment).train.epochs
    assert epochs <= 50 and space.scheduler.grace_period <= 2
    domains = space.tune_domains()
    for backbone, weights in (("resnet50", R50), ("resnet101", R101)):
        exp = experiment_from_dict(
            space.experiment_for(
                {"model.backbone": backbone, "train.pretrained": domains["train.pretrained"], "train.lr": 3e-5}
            )
        )
        assert (exp.model.backbone, exp.train.pretrained) == (backbone, weights)
    # The record of a sweep (relaunch.sweep_config) parses back into the same space.
    from detr_ray.relaunch import sweep_config

    again = parse_space(sweep_config(space), "record")
    assert [(x.key, x.kind, x.args) for x in again.params] == [(x.key, x.kind, x.args) for x in space.params]


def test_coco_finetune_documents_a_valid_r50_to_r101_transfer_option():
    """The commented-out transfer block of coco_finetune.yaml, put in place of train.pretrained:
    R101 trials take the transformer and heads of the R50 DETR and ImageNet's R101 backbone."""
    text = COCO_FINETUNE.read_text()
    block = text.split("# BEGIN r50-to-r101 transfer\n")[1].split("  # END r50-to-r101 transfer")[0]
    raw = yaml.safe_load(text)
    del raw["search"]["train.pretrained"]
    raw["search"].update(yaml.safe_load("\n".join(line.strip().removeprefix("# ") for line in block.splitlines())))
    space = parse_space(raw, "transfer")
    domains = space.tune_domains()
    sample = {k: domains[k] for k in ("train.pretrained", "train.pretrained_backbone")}
    r101 = experiment_from_dict(space.experiment_for({**sample, "model.backbone": "resnet101"})).train
    r50 = experiment_from_dict(space.experiment_for({**sample, "model.backbone": "resnet50"})).train
    assert (r101.pretrained, r101.pretrained_backbone) == (R50, "torchvision")
    assert (r50.pretrained, r50.pretrained_backbone) == (R50, "")


@pytest.mark.parametrize(
    "search,needle",
    [
        (
            {"train.pretrained": {"by": {"model.backbone": {"resnet50": "a.pth"}}}},
            "'model.backbone' must be a choice of this search space",
        ),
        (
            {
                "model.backbone": {"choice": ["resnet50", "resnet101"]},
                "train.pretrained": {"by": {"model.backbone": {"resnet50": "a.pth"}}},
            },
            "search.train.pretrained.by.model.backbone: needs a value for each of ['resnet50', 'resnet101'] and "
            "nothing else; missing ['resnet101']",
        ),
        (
            {
                "model.backbone": {"choice": ["resnet50"]},
                "train.pretrained": {"by": {"model.backbone": {"resnet50": "a", "resnet18": "b"}}},
            },
            "not a choice ['resnet18']",
        ),
        (
            {
                "model.backbone": {"choice": ["resnet50"]},
                "model.dropout": {"by": {"model.backbone": {"resnet50": 1.5}}},
            },
            "search.model.dropout.by.model.backbone.resnet50: value 1.5 is invalid",
        ),
        (
            {"train.lr": {"loguniform": [1e-5, 1e-4]}, "train.pretrained": {"by": {"train.lr": {"x": "a"}}}},
            "got loguniform",
        ),
        ({"train.pretrained": {"by": "model.backbone"}}, "search.train.pretrained.by: expected {choice key:"),
    ],
)
def test_invalid_by_tables_name_file_and_key(tmp_path, search, needle):
    f = _write(tmp_path, {"search": search})
    with pytest.raises(ConfigError) as e:
        load_space(f)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_a_searched_key_under_its_old_name_names_the_new_one():
    with pytest.raises(ConfigError, match="'data.cpus' is now called data.ray_data_cpus"):
        parse_space({"search": {"data.cpus": {"choice": [1.0, 2.0]}}}, "space.yaml")
