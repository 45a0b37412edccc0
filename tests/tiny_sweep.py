"""The tiny model, experiment, search space and scripts/tune.py command line that the sweep, train
and fault tests share, written once so that they stay alike; each builder returns a new dict, so a
test may change its copy. (tests/conftest.py's tiny_config is another, a DETRConfig for model tests.)"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_model(**overrides) -> dict:
    """The experiment's `model` section: a resnet18 DETR small enough to train on 2 CPUs. Its
    backbone stops after layer3, as the demo's does: a checkpoint (model and AdamW state) of about
    35 MB instead of 135 MB, which every epoch of every test run writes, hashes and copies."""
    return {
        "backbone": "resnet18",
        "backbone_stages": 3,
        "hidden_dim": 32,
        "nheads": 4,
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 64,
        "num_queries": 5,
        "frozen_bn": False,
        **overrides,
    }


def demo_shards(root) -> dict:
    """The `data` keys that name the demo shards a test made under `root` (ensure_demo_shards with
    its small sizes). Not `demo_root`: a run resolves that with ensure_demo_shards' default sizes,
    which replaces the test's shards with the 400 + 100 image demo and scores every epoch on 100
    validation images."""
    return {"train": f"{root}/train", "val": f"{root}/val", "augment": "demo"}


def tiny_experiment(data: dict, epochs: int, steps: int, model: dict | None = None, **train) -> dict:
    """An experiment of `epochs` epochs of `steps` steps on the data of `data` (demo_shards, ...),
    small batches, no retries, no TensorBoard; `train` adds to or overrides the train section."""
    return {
        "model": tiny_model() if model is None else model,
        "data": {**data, "batch_size": 4, "shuffle_buffer": 8, "decode_num_cpus": 0.25},
        "train": {
            "epochs": epochs,
            "max_steps_per_epoch": steps,
            "max_failures": 0,
            "tensorboard": False,
            "cpus_per_worker": 0.5,
            **train,
        },
    }


def sweep_space(num_samples: int, epochs: int, steps: int, **train) -> dict:
    """A search space for scripts/tune.py: the tiny experiment on the demo data (--data names it),
    lr and weight decay searched, ASHA from epoch 1."""
    experiment = tiny_experiment({}, epochs, steps, **train)
    experiment["data"]["augment"] = "demo"
    return {
        "experiment": experiment,
        "search": {
            "train.lr": {"loguniform": [1.0e-5, 1.0e-3]},
            "train.weight_decay": {"loguniform": [1.0e-5, 1.0e-2]},
        },
        "scheduler": {"grace_period": 1, "reduction_factor": 2, "num_samples": num_samples, "seed": 0},
    }


def tune_command(space: Path, data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """scripts/tune.py on a local Ray of 2 CPUs, then `extra`."""
    return [
        sys.executable,
        str(REPO / "scripts" / "tune.py"),
        "--space",
        str(space),
        "--data",
        str(data),
        "--storage",
        str(storage),
        "--name",
        name,
        "--num-cpus",
        "2",
        *extra,
    ]
