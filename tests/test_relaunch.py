"""The relaunch rule, without Ray: records written and compared, on local paths and file:// URIs."""

import copy
import json
import logging

import pytest
import torch

from detr_ray import checkpoint as ckpt
from detr_ray import relaunch
from detr_ray.config import experiment_from_dict
from detr_ray.model import build_model
from detr_ray.relaunch import ABSENT, RelaunchError, check_sweep, differences, plan_run, record_sweep
from detr_ray.train.trainer import demo_experiment
from detr_ray.tune.space import parse_space
from tests.conftest import tiny_config


def _exp(**train):
    raw = demo_experiment()
    raw["train"].update(train)
    return experiment_from_dict(raw)


def _record(run_dir):
    return json.loads((run_dir / relaunch.RUN_RECORD).read_text())


def test_differences_lists_changed_and_missing_keys_with_numbers_compared_by_value():
    stored = {"train": {"lr": 1e-4, "epochs": 10, "tensorboard": True}, "model": {"backbone": "resnet18"}}
    requested = {"train": {"lr": 2e-4, "epochs": 10.0, "tensorboard": 1}, "data": {"batch_size": 4}}
    assert differences(stored, requested) == [
        ("data.batch_size", ABSENT, 4),
        ("model.backbone", "resnet18", ABSENT),
        ("train.lr", 1e-4, 2e-4),
        ("train.tensorboard", True, 1),  # a bool is not a number here
    ]
    assert differences({"a": (1, 2)}, {"a": [1, 2]}) == []  # as a JSON record gives it back


@pytest.mark.parametrize("as_uri", [False, True])
def test_same_configuration_resumes_and_a_different_one_is_refused(tmp_path, as_uri):
    run_dir = tmp_path / "runs" / "r"
    location = run_dir.as_uri() if as_uri else str(run_dir)
    plan = plan_run(location, _exp(lr=2e-4))
    assert plan.action == "start" and _record(run_dir)["config"]["train"]["lr"] == 2e-4
    assert _record(run_dir)["written_by"] == "detr-ray"

    assert plan_run(location, _exp(lr=2e-4)).action == "resume"
    before = (run_dir / relaunch.RUN_RECORD).read_bytes()
    with pytest.raises(RelaunchError) as e:
        plan_run(location, _exp(lr=1e-3, weight_decay=0.0))
    message = str(e.value)
    assert "train.lr: 0.0002 -> 0.001" in message and "train.weight_decay: 0.0001 -> 0.0" in message
    assert "--name" in message and "--resume-as-stored" in message
    assert (run_dir / relaunch.RUN_RECORD).read_bytes() == before  # nothing recorded for a refused launch


def test_only_more_epochs_continue_the_run(tmp_path):
    run_dir = tmp_path / "r"
    plan_run(str(run_dir), _exp(epochs=5))
    with pytest.raises(RelaunchError, match=r"train\.epochs: 5 -> 3"):
        plan_run(str(run_dir), _exp(epochs=3))
    with pytest.raises(RelaunchError, match=r"train\.lr: 0\.0002 -> 0\.001"):  # more epochs do not excuse the rest
        plan_run(str(run_dir), _exp(epochs=8, lr=1e-3))
    plan = plan_run(str(run_dir), _exp(epochs=8))
    assert plan.action == "continue" and "continuing to 8 epochs (was 5)" in plan.message
    assert plan.experiment.train.epochs == 8 and _record(run_dir)["config"]["train"]["epochs"] == 8
    assert plan_run(str(run_dir), _exp(epochs=8)).action == "resume"


def test_resume_as_stored_runs_the_stored_configuration(tmp_path, caplog):
    run_dir = tmp_path / "r"
    with pytest.raises(RelaunchError, match="no run at"):
        plan_run(str(run_dir), _exp(), as_stored=True)
    assert not run_dir.exists()
    plan_run(str(run_dir), _exp(lr=2e-4, epochs=5))
    with caplog.at_level(logging.WARNING, logger="detr_ray.relaunch"):
        plan = plan_run(str(run_dir), _exp(lr=1e-3, epochs=9), as_stored=True)
    assert plan.action == "resume as stored"
    assert plan.experiment.train.lr == 2e-4 and plan.experiment.train.epochs == 5
    assert "train.lr: 0.0002 -> 0.001" in caplog.text  # what it ignored is said
    assert _record(run_dir)["config"]["train"]["lr"] == 2e-4


def test_a_file_of_the_records_name_that_is_not_ours_is_left_alone(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    theirs = run_dir / relaunch.RUN_RECORD
    for content in (b'{"config": {"train": {}}}', b"not json"):
        theirs.write_bytes(content)
        with pytest.raises(RelaunchError, match=f"{theirs}: not a configuration record written by detr-ray"):
            plan_run(str(run_dir), _exp())
        assert theirs.read_bytes() == content


def test_a_run_without_a_record_is_compared_with_its_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    model = build_model(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    for epoch in (1, 2):
        config = _exp(lr=2e-4, epochs=epoch + 1).to_dict()
        ckpt.save(
            run_dir / f"checkpoint_epoch{epoch:04d}",
            model,
            optimizer,
            None,
            None,
            ckpt.TrainingState(epoch=epoch, global_step=epoch, config=config),
        )
    with pytest.raises(RelaunchError, match=r"train\.lr: 0\.0002 -> 0\.001"):
        plan_run(str(run_dir), _exp(lr=1e-3, epochs=3))
    assert not (run_dir / relaunch.RUN_RECORD).exists()
    assert plan_run(str(run_dir), _exp(lr=2e-4, epochs=3)).action == "resume"  # epoch 2's config: 3 epochs
    assert _record(run_dir)["config"]["train"]["epochs"] == 3


SPACE = {
    "experiment": {"model": {"backbone": "resnet18", "hidden_dim": 32}, "train": {"epochs": 3, "lr": "1e-4"}},
    "search": {"train.lr": {"loguniform": [1.0e-5, 1.0e-3]}, "model.dropout": {"uniform": [0.0, 0.2]}},
    "scheduler": {"grace_period": 1, "reduction_factor": 2, "num_samples": 4, "seed": 0},
}


def _space(**changes):
    raw = copy.deepcopy(SPACE)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        raw[section][name.replace("__", ".")] = value
    return parse_space(raw, "space.yaml")


def test_sweep_restore_with_a_changed_space_is_refused_unless_as_stored(tmp_path, caplog):
    exp_dir = str(tmp_path / "sweep")
    with pytest.raises(RelaunchError, match="without detr_ray_sweep.json"):  # a sweep from before the records
        check_sweep(exp_dir, _space(), parse=parse_space)
    with caplog.at_level(logging.WARNING, logger="detr_ray.relaunch"):
        assert check_sweep(exp_dir, _space(), parse=parse_space, as_stored=True).params == _space().params

    record_sweep(exp_dir, _space())
    same = _space(experiment__train={"epochs": 3, "lr": 1e-4})  # the YAML's "1e-4" string, as a number: the same value
    assert check_sweep(exp_dir, same, parse=parse_space) is same
    changed = _space(
        search__train__lr={"loguniform": [1.0e-5, 1.0e-2]},
        scheduler__num_samples=6,
        experiment__model={"backbone": "resnet34", "hidden_dim": 32},
    )
    with pytest.raises(RelaunchError) as e:
        check_sweep(exp_dir, changed, parse=parse_space)
    message = str(e.value)
    assert "search.train.lr.loguniform: [1e-05, 0.001] -> [1e-05, 0.01]" in message
    assert (
        "scheduler.num_samples: 4 -> 6" in message and "experiment.model.backbone: 'resnet18' -> 'resnet34'" in message
    )
    assert "--resume-as-stored" in message and "--name" in message

    stored = check_sweep(exp_dir, changed, parse=parse_space, as_stored=True)
    assert stored.scheduler.num_samples == 4 and stored.experiment["model"]["backbone"] == "resnet18"
    assert [p.args for p in stored.params if p.key == "train.lr"] == [[1.0e-5, 1.0e-3]]
