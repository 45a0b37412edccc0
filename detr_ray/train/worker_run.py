"""What Ray Train hands every worker of a run: the entry point and the run's WorkerRun.

Apart from loop.py (the loop itself) because Ray Train's TrainController process unpickles both
to start the workers: importing this module there must not import the model, torchvision and
pycocotools, which only the workers use (2-3 s of CPU per run, measured on 2 cores)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detr_ray.config import ExperimentConfig
from detr_ray.testing_hooks import TestingHooks

RUN_KEY = "run"  # the key of the WorkerRun in TorchTrainer's train_loop_config


@dataclass(frozen=True)
class WorkerRun:
    """What every Train worker of a run receives: the parsed experiment and what build_trainer
    resolved once for the run (the shard locations, the TensorBoard directory), plus the test
    hooks (inert in production: detr_ray/testing_hooks.py)."""

    experiment: ExperimentConfig
    train_uri: str
    val_uri: str
    tensorboard_dir: str | None = None
    testing: TestingHooks = field(default_factory=TestingHooks)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: `config[RUN_KEY]` is this run's WorkerRun (loop.run_worker)."""
    from detr_ray.train.loop import run_worker

    run_worker(config[RUN_KEY])
