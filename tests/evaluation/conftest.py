"""Fixtures of the evaluation tests: a local Ray per module, a tiny DETR trained on small demo
shards (trained once per session, kept on disk), and an experiment directory built by hand
around it (the contract of detr_ray/tune/summary.py: best.json + trials.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detr_ray import checkpoint as ckpt
from detr_ray.local_ray import init as init_local_ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    init_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _train_tiny(root: Path) -> dict:
    from detr_ray.config import experiment_from_dict
    from detr_ray.data.demo import make_demo_dataset
    from detr_ray.train.trainer import build_trainer, demo_experiment

    train, val = make_demo_dataset(root / "data", num_train=32, num_val=12, shard_size=8, workers=0)
    exp = demo_experiment()
    exp["model"].update(hidden_dim=32, dim_feedforward=64, num_queries=5)
    exp["data"].update(train=train, val=val, augment="demo", batch_size=4, shuffle_buffer=8)
    exp["train"].update(epochs=2, max_steps_per_epoch=3, max_failures=0, cpus_per_worker=1.0, keep_checkpoints=2)
    build_trainer(experiment_from_dict(exp), name="tiny", storage_path=str(root / "runs")).fit()
    run = root / "runs" / "tiny"
    info = {
        "train": train,
        "val": val,
        "run": str(run),
        "checkpoint": str(run / "checkpoint_epoch0002"),
        "checkpoint_epoch1": str(run / "checkpoint_epoch0001"),
        "experiment": exp,
    }
    (root / "tiny.json").write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def tiny_run(local_ray, tmp_path_factory) -> dict:
    """Paths of a 2-epoch run of a tiny DETR on 32 demo images, and its 12 val images."""
    root = tmp_path_factory.getbasetemp() / "evaluation-tiny-run"
    if (root / "tiny.json").exists():
        return json.loads((root / "tiny.json").read_text())
    root.mkdir(exist_ok=True)
    return _train_tiny(root)


SEARCH = {
    "train.lr": {"loguniform": [1e-4, 1e-3]},
    "model.backbone": {"choice": ["resnet18", "resnet34"]},
    "model.num_queries": {"fixed": 5},
}


def make_experiment(directory: Path, run: dict, *, best: bool = True, trials: bool = True) -> Path:
    """An experiment directory around the tiny run: trial t1 (the run's last checkpoint),
    t2 (stopped early, its first checkpoint), t3 (failed, nothing)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = json.loads((Path(run["checkpoint"]) / ckpt.STATE).read_text())
    state1 = json.loads((Path(run["checkpoint_epoch1"]) / ckpt.STATE).read_text())
    ap, ap1 = state["metrics"]["val/AP"], state1["metrics"]["val/AP"]
    history = [
        {
            "epoch": 1,
            "train/loss": state1["metrics"]["train/loss"],
            "val/AP": ap1,
            "val/AP50": state1["metrics"]["val/AP50"],
        },
        {
            "epoch": 2,
            "train/loss": state["metrics"]["train/loss"],
            "val/AP": ap,
            "val/AP50": state["metrics"]["val/AP50"],
        },
    ]
    records = [
        {
            "trial": "t1",
            "config": {"train.lr": 2e-4, "model.backbone": "resnet18", "model.num_queries": 5},
            "best": ap,
            "epochs": 2,
            "status": "completed",
            "checkpoint": run["checkpoint"],
            "history": history,
        },
        {
            "trial": "t2",
            "config": {"train.lr": 8e-4, "model.backbone": "resnet34", "model.num_queries": 5},
            "best": ap1 - 0.5,
            "epochs": 1,
            "status": "stopped early (ASHA)",
            "checkpoint": run["checkpoint_epoch1"],
            "history": history[:1],
        },
        {
            "trial": "t3",
            "config": {"train.lr": 5e-4, "model.backbone": "resnet18", "model.num_queries": 5},
            "best": None,
            "epochs": 0,
            "status": "error",
            "checkpoint": None,
            "history": [],
        },
    ]
    if best:
        (directory / "best.json").write_text(
            json.dumps(
                {
                    "metric": "val/AP",
                    "mode": "max",
                    "trial": "t1",
                    "value": ap,
                    "config": records[0]["config"],
                    "experiment": run["experiment"],
                    "checkpoint": run["checkpoint"],
                    "data": {"train": run["train"], "val": run["val"]},
                }
            )
        )
    if trials:
        (directory / "trials.json").write_text(
            json.dumps({"metric": "val/AP", "mode": "max", "search": SEARCH, "trials": records})
        )
    return directory
