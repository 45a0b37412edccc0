"""A sweep's trial: `trial_driver`, the function Tune runs per trial (Ray 2.60, Train V2: it
builds the trial's TorchTrainer with `TuneReportCallback` and calls fit), and the fixed entries
of a trial's config next to its sampled hyperparameters."""

from __future__ import annotations

from typing import Any

from detr_ray.config import experiment_from_dict
from detr_ray.tune.space import apply_sample

EXPERIMENT_KEY = "_experiment"  # fixed entries of a trial's config that are not hyperparameters
RUNS_KEY = "_runs_storage"
SHARDS_KEY = "_shards"  # {"train", "val"}: the shard locations, resolved once by the sweep's entry point


def trial_driver(config: dict[str, Any]) -> None:
    """Tune trainable: one trial is one TorchTrainer run of the sampled experiment."""
    import ray.tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from detr_ray.train.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    # Tune hands the trial its config as a dict: parsed here, once, for the whole trial.
    experiment = experiment_from_dict(apply_sample(config[EXPERIMENT_KEY], sample_of(config)), f"trial {trial_id}")
    shards = config.get(SHARDS_KEY)  # resolved once for the sweep (absent in sweeps recorded without it)
    DataContext.get_current().enable_progress_bars = False  # many trials' bars would bury Tune's table
    trainer = build_trainer(
        experiment,
        name=trial_id,
        storage_path=config[RUNS_KEY],
        callbacks=[TuneReportCallback()],
        shards=(shards["train"], shards["val"]) if shards else None,
    )
    trainer.fit()


def sample_of(config: dict[str, Any]) -> dict[str, Any]:
    """The sampled hyperparameters of a trial's config (without the fixed entries)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}
