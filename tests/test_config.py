import pytest

from detr_ray.config import ConfigError, from_dict, load_yaml
from detr_ray.model import DETRConfig


def test_from_dict_builds_and_converts():
    cfg = from_dict(DETRConfig, {"backbone": "resnet101", "dropout": 0, "num_classes": 3}, "model")
    assert cfg.backbone == "resnet101" and cfg.dropout == 0.0 and isinstance(cfg.dropout, float)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"hidden": 3}, "model: unknown key(s) hidden"),
        ({"hidden_dim": "big"}, "model.hidden_dim: expected an integer"),
        ({"aux_loss": 1}, "model.aux_loss: expected true/false"),
        ({"backbone": "resnet152"}, "model.backbone: unknown backbone"),
    ],
)
def test_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(DETRConfig, data, "model")
    assert needle in str(e.value)


def test_load_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        load_yaml(lst)


def test_exponent_without_dot_is_a_number(tmp_path):
    from detr_ray.config import TrainConfig, apply_overrides, experiment_from_dict

    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: 1e-4\n  weight_decay: 1e-2\n")
    exp = experiment_from_dict(apply_overrides(load_yaml(f), ["train.lr_backbone=1e-5"]))
    assert exp.train.lr == 1e-4 and exp.train.weight_decay == 1e-2 and exp.train.lr_backbone == 1e-5
    with pytest.raises(ConfigError, match="config.train.lr: expected a number, got 'fast'"):
        experiment_from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="config: unknown section"):
        experiment_from_dict({"trian": {}})
    assert isinstance(from_dict(TrainConfig, {"epochs": 3}), TrainConfig)


def test_the_old_name_of_ray_data_cpus_is_read_with_a_warning(tmp_path, caplog):
    """Configs stored under the old key (checkpoints, run records, YAMLs) still load."""
    import logging

    import torch

    from detr_ray import checkpoint as ckpt
    from detr_ray.config import experiment_from_dict
    from detr_ray.model import build_model

    with caplog.at_level(logging.WARNING, logger="detr_ray.config"):
        exp = experiment_from_dict({"data": {"cpus": 2.0}}, "old.yaml")
    assert (
        exp.data.ray_data_cpus == 2.0 and "old.yaml.data.cpus is now called old.yaml.data.ray_data_cpus" in caplog.text
    )
    with pytest.raises(ConfigError, match="cpus is the old name of ray_data_cpus; give only ray_data_cpus"):
        experiment_from_dict({"data": {"cpus": 2.0, "ray_data_cpus": 2.0}})
    with pytest.raises(ConfigError, match="data.ray_data_cpus: 0.5 is below one decode task's decode_num_cpus"):
        experiment_from_dict({"data": {"cpus": 0.5}})

    # A checkpoint whose stored config has the old key.
    model_cfg = DETRConfig(
        backbone="resnet18",
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=1,
        dim_feedforward=64,
        num_queries=5,
        num_classes=3,
        frozen_bn=False,
    )
    torch.manual_seed(0)
    config = experiment_from_dict({"model": vars(model_cfg)}).to_dict()
    config["data"]["cpus"] = config["data"].pop("ray_data_cpus") or 1.0
    ckpt.save(tmp_path / "old", build_model(model_cfg), None, None, None, ckpt.TrainingState(1, 1, config))
    stored = ckpt.load(tmp_path / "old").state.config
    assert experiment_from_dict(stored, "state.json: config").data.ray_data_cpus == 1.0
