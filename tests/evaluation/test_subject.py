import json
import logging
from pathlib import Path

import pytest

from detr_ray import checkpoint as ckpt
from detr_ray.evaluation.subject import EvaluationTargetError, from_checkpoint, from_experiment, from_results, resolve
from detr_ray.evaluation.training_history import parameter_importances, run_history
from detr_ray.model import build_model
from tests.conftest import tiny_config
from tests.evaluation.conftest import SEARCH, make_experiment

EXPERIMENT = {
    "model": {
        "backbone": "resnet18",
        "hidden_dim": 32,
        "nheads": 4,
        "enc_layers": 2,
        "dec_layers": 2,
        "dim_feedforward": 64,
        "num_queries": 6,
    },
    "data": {"train": "/data/shards/train", "val": "/data/shards/val", "augment": "demo"},
    "train": {"epochs": 2},
}


def _save(directory: Path, epoch: int, ap: float) -> str:
    state = ckpt.TrainingState(
        epoch,
        epoch * 3,
        EXPERIMENT,
        {"label_to_category_id": [1, 2, 3], "names": ["a", "b", "c"]},
        {"val/AP": ap, "val/AP50": 2 * ap, "train/loss": 10.0 - epoch},
    )
    ckpt.save(directory, build_model(tiny_config()), None, None, None, state)
    return str(directory)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with two checkpoints, shaped like the tiny run of the conftest."""
    root = tmp_path_factory.mktemp("run") / "myrun"
    return {
        "checkpoint": _save(root / "checkpoint_epoch0002", 2, 0.30),
        "checkpoint_epoch1": _save(root / "checkpoint_epoch0001", 1, 0.10),
        "experiment": EXPERIMENT,
        "train": EXPERIMENT["data"]["train"],
        "val": "/data/other/val",
    }


def test_experiment_with_best_json(run, tmp_path):
    s = from_experiment(str(make_experiment(tmp_path / "exp", run)), tmp_path / "work")
    assert s.kind == "experiment" and s.trial == "t1" and s.checkpoint == Path(run["checkpoint"])
    assert s.val == "/data/other/val"  # best.json's data.val, not the config's
    assert s.hyperparameters["train.lr"] == 2e-4 and s.best_value == pytest.approx(0.30)
    assert [h["epoch"] for h in s.history] == [1, 2] and len(s.trials) == 3 and s.search == SEARCH
    assert s.experiment == EXPERIMENT


def test_experiment_without_best_json_takes_the_best_verified_trial(run, tmp_path, caplog):
    exp = make_experiment(tmp_path / "exp", run, best=False)
    s = from_experiment(str(exp), tmp_path / "work")
    assert s.trial == "t1" and s.checkpoint == Path(run["checkpoint"])
    assert s.val == "/data/shards/val"  # from the checkpoint's config
    doc = json.loads((exp / "trials.json").read_text())
    doc["trials"][0]["checkpoint"] = str(tmp_path / "gone")  # t1's checkpoint is lost: t2 is next
    (exp / "trials.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        s = from_experiment(str(exp), tmp_path / "work")
    assert s.trial == "t2" and s.checkpoint == Path(run["checkpoint_epoch1"])
    assert "trying the next best: " + str(tmp_path / "gone") + ": not a checkpoint directory" in caplog.text
    for t in doc["trials"]:
        t["checkpoint"] = None
    (exp / "trials.json").write_text(json.dumps(doc))
    with pytest.raises(
        EvaluationTargetError, match=r"trials.json: no trial has a finite 'val/AP' and a checkpoint that verifies"
    ):
        from_experiment(str(exp), tmp_path / "work")


def test_bad_experiment_directories_are_clear_errors(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationTargetError, match=r"empty: neither best.json nor trials.json"):
        from_experiment(str(tmp_path / "empty"), tmp_path)
    exp = make_experiment(tmp_path / "exp", run, trials=False)
    best = json.loads((exp / "best.json").read_text())
    (exp / "best.json").write_text("{")
    with pytest.raises(EvaluationTargetError, match=r"best.json: not valid JSON"):
        from_experiment(str(exp), tmp_path)
    (exp / "best.json").write_text(json.dumps({k: v for k, v in best.items() if k != "checkpoint"}))
    with pytest.raises(EvaluationTargetError, match=r"best.json: missing field 'checkpoint'"):
        from_experiment(str(exp), tmp_path)
    (exp / "best.json").write_text(json.dumps({**best, "checkpoint": 7}))
    with pytest.raises(EvaluationTargetError, match=r"best.json.checkpoint: expected str"):
        from_experiment(str(exp), tmp_path)
    corrupt = tmp_path / "corrupt"
    _save(corrupt, 1, 0.1)
    (corrupt / "model.pt").write_bytes(b"x" + (corrupt / "model.pt").read_bytes()[1:])
    (exp / "best.json").write_text(json.dumps({**best, "checkpoint": str(corrupt)}))
    with pytest.raises(EvaluationTargetError, match=r"best.json.checkpoint: .*model.pt: contents do not match"):
        from_experiment(str(exp), tmp_path)


def test_experiment_and_checkpoint_behind_uris_are_fetched_and_verified(run, tmp_path):
    exp = make_experiment(tmp_path / "exp", run)
    best = json.loads((exp / "best.json").read_text())
    (exp / "best.json").write_text(json.dumps({**best, "checkpoint": "file://" + run["checkpoint"]}))
    s = from_experiment("file://" + str(exp), tmp_path / "work")
    assert s.checkpoint.parent == tmp_path / "work" / "checkpoints" and ckpt.verify(s.checkpoint)


def test_parameter_importances(run, tmp_path):
    s = from_experiment(str(make_experiment(tmp_path / "exp", run)), tmp_path / "work")
    imp = parameter_importances(s)
    assert set(imp) == {"train.lr", "model.backbone"}  # the fixed parameter is not tuned
    assert sum(imp.values()) == pytest.approx(1.0)
    s.trials = s.trials[:1] + s.trials[2:]  # one finished trial left
    assert parameter_importances(s).startswith("not enough trials (1 finished")
    s.search = {"train.lr": {"beta": [0, 1]}}
    assert "unknown distribution 'beta'" in parameter_importances(s)
    assert parameter_importances(from_checkpoint(run["checkpoint"], tmp_path)) == "no trials.json: not a sweep"


def test_checkpoint_history_from_tensorboard_or_kept_checkpoints(run, tmp_path):
    s = from_checkpoint(run["checkpoint"], tmp_path)
    assert s.kind == "checkpoint" and s.val == "/data/shards/val" and s.best_value == pytest.approx(0.30)
    assert [(h["epoch"], h["val/AP"]) for h in s.history] == [(1, 0.10), (2, 0.30)]  # from the two checkpoints
    from tensorboardX import SummaryWriter

    tb = Path(run["checkpoint"]).parent / "tensorboard"
    writer = SummaryWriter(str(tb))
    for epoch in (1, 2, 3):
        writer.add_scalar("train/loss", 5.0 / epoch, epoch)
        writer.add_scalar("val/AP", 0.1 * epoch, epoch)
    writer.close()
    try:
        history = run_history(Path(run["checkpoint"]))
        assert [h["epoch"] for h in history] == [1, 2, 3]
        assert history[2]["train/loss"] == pytest.approx(5 / 3) and history[2]["val/AP"] == pytest.approx(0.3)
    finally:
        for f in tb.iterdir():
            f.unlink()
        tb.rmdir()


def test_resolve_for_compare(run, tmp_path):
    (tmp_path / "other.json").write_text("[]")
    assert resolve(str(tmp_path / "other.json"), tmp_path).kind == "results"
    assert resolve(str(make_experiment(tmp_path / "exp", run)), tmp_path).kind == "experiment"
    assert resolve(run["checkpoint"], tmp_path).kind == "checkpoint"
    with pytest.raises(EvaluationTargetError, match=r"nothing: not a COCO results file"):
        resolve(str(tmp_path / "nothing"), tmp_path)
    with pytest.raises(EvaluationTargetError, match=r"no such results file"):
        from_results(tmp_path / "missing.json")


def _save_weights(directory: Path, seed: int) -> dict:
    """A checkpoint whose model weights depend on `seed`; returns them."""
    import torch

    torch.manual_seed(seed)
    model = build_model(tiny_config())
    state = ckpt.TrainingState(10, 30, EXPERIMENT, {"label_to_category_id": [1, 2, 3]}, {"val/AP": 0.1 * seed})
    ckpt.save(directory, model, None, None, None, state)
    return model.state_dict()


def _same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_named_checkpoints_of_two_runs_are_each_scored_with_their_own_weights(tmp_path):
    """Two runs' checkpoint_epoch0010 behind URIs (the subject and a --compare one), fetched into
    one work directory: each is loaded with its own weights."""
    from detr_ray.evaluation.inference import load_detector

    weights = {
        run: _save_weights(tmp_path / run / "checkpoint_epoch0010", seed) for seed, run in enumerate(("run_a", "run_b"))
    }
    assert not _same_weights(weights["run_a"], weights["run_b"])
    main = from_checkpoint(f"file://{tmp_path}/run_a/checkpoint_epoch0010", tmp_path / "work")
    other = resolve(f"file://{tmp_path}/run_b/checkpoint_epoch0010", tmp_path / "work")
    assert main.checkpoint != other.checkpoint and main.name == other.name == "checkpoint_epoch0010"
    assert (
        main.checkpoint.name.startswith("checkpoint_epoch0010")
        and main.checkpoint.parent == tmp_path / "work" / "checkpoints"
    )
    for subject, run in ((main, "run_a"), (other, "run_b")):
        detector = load_detector(subject.checkpoint, subject.manifest)
        assert _same_weights(detector.weights, weights[run]), f"{subject.source} scored with other weights"
    # The same URI again (e.g. also given to --compare) is the same checkpoint.
    assert (
        from_checkpoint(f"file://{tmp_path}/run_a/checkpoint_epoch0010/", tmp_path / "work").checkpoint
        == main.checkpoint
    )


def test_what_is_scored_is_the_checkpoint_that_was_verified(tmp_path):
    """A checkpoint directory that holds another checkpoint by the time it is scored (rewritten,
    or the copy of another run's) is refused when loaded for scoring."""
    from detr_ray.evaluation.end_to_end import score
    from detr_ray.evaluation.inference import InferenceConfig

    _save_weights(tmp_path / "run" / "checkpoint_epoch0010", seed=0)
    subject = from_checkpoint(str(tmp_path / "run" / "checkpoint_epoch0010"), tmp_path / "work")
    _save_weights(tmp_path / "run" / "checkpoint_epoch0010", seed=1)
    with pytest.raises(
        ckpt.CheckpointError, match=r"checkpoint_epoch0010/MANIFEST.json: not the checkpoint verified earlier"
    ):
        score(subject, "unused: refused before inference", None, tmp_path / "detections.json", InferenceConfig())


def test_best_json_checkpoint_that_does_not_verify_falls_back_to_the_best_trial_that_does(run, tmp_path, caplog):
    import shutil

    copy = dict(run)
    for key in ("checkpoint", "checkpoint_epoch1"):
        copy[key] = str(tmp_path / "run" / Path(run[key]).name)
        shutil.copytree(run[key], copy[key])
    exp = make_experiment(tmp_path / "exp", copy)
    model = Path(copy["checkpoint"]) / "model.pt"
    model.write_bytes(model.read_bytes()[:-1] + b"x")  # t1, best.json's checkpoint, is corrupt
    with caplog.at_level(logging.WARNING):
        s = from_experiment(str(exp), tmp_path / "work")
    assert s.trial == "t2" and s.checkpoint == Path(copy["checkpoint_epoch1"]) and s.best_value == pytest.approx(-0.4)
    assert "best.json.checkpoint does not verify" in caplog.text and "model.pt: contents do not match" in caplog.text
    assert s.val == "/data/shards/val"  # from the checkpoint, as without best.json
