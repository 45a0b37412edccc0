"""A Ray Train TorchTrainer for one DETR run, built from an ExperimentConfig."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from detr_ray.config import ExperimentConfig, bundled_search_space, load_yaml
from detr_ray.data.datasets import build_datasets, resolve_shards
from detr_ray.data.recipe import augment_recipe
from detr_ray.data.storage import is_uri
from detr_ray.testing_hooks import TestingHooks

log = logging.getLogger(__name__)


def demo_experiment() -> dict[str, Any]:
    """The demo experiment (a small DETR that learns the synthetic demo dataset in minutes on a
    CPU), as a new dict: the `experiment` of search_spaces/demo.yaml, the demo sweep's fixed
    experiment, so that the two never drift apart."""
    return {
        section: dict(values or {})
        for section, values in (load_yaml(bundled_search_space("demo.yaml")).get("experiment") or {}).items()
    }


def default_storage() -> str:
    return os.path.abspath(os.environ.get("DETR_RAY_STORAGE", os.path.join("runs")))


def tensorboard_dir(storage_path: str, name: str) -> str | None:
    """TensorBoard event files of rank 0: next to the run in local storage (remote storage:
    under ./runs/tensorboard/<name> on the node of rank 0)."""
    if is_uri(storage_path):
        return os.path.abspath(os.path.join("runs", "tensorboard", name))
    return os.path.join(storage_path, name, "tensorboard")


@dataclass(frozen=True)
class RunResources:
    """What one training run holds at once: its Train workers' bundles and its Ray Data CPUs."""

    num_workers: int
    worker: dict[str, float]  # one Train worker's bundle, e.g. {"CPU": 1.0, "GPU": 0.5}
    data_cpus: float  # the cap on this run's Ray Data tasks (DataConfig.ray_data_cpus)

    @property
    def cpus(self) -> float:
        return self.num_workers * self.worker.get("CPU", 0.0) + self.data_cpus

    @property
    def gpus(self) -> float:
        return self.num_workers * self.worker.get("GPU", 0.0)


def run_resources(exp: ExperimentConfig) -> RunResources:
    t = exp.train
    worker = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker:
        worker["GPU"] = t.gpus_per_worker
    return RunResources(t.num_workers, worker, exp.data.ray_data_cpus or t.num_workers * exp.data.decode_num_cpus)


def data_config(execution_options):
    """ray.train.DataConfig that splits "train" as Ray Train does and "val" without dropping rows.

    Ray Train splits every dataset with `streaming_split(equal=True)`, which drops up to
    workers - 1 rows so that all workers take the same number of steps: right for "train" (the
    workers step together), wrong for "val", which must be scored on every image. "val" is split
    with equal=False instead: each val block goes to one worker, none is dropped, and the workers
    still infer in parallel (uneven parts are fine, `_validate` runs no collectives while
    inferring). Not the alternatives: an unsplit "val" would be decoded by every worker, and rank
    0 alone would infer it all.

    A run of one worker (a sweep's usual trial) has nothing to split: it iterates both datasets
    itself, as Ray Train does for a dataset it is told not to split. That spares the two
    SplitCoordinator actors a split costs, each a process that imports torch to unpickle the
    pipeline (about 4 s of CPU, for every run and every trial)."""
    import ray.train

    class SplitValWhole(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if world_size == 1:
                return [{name: self._whole(name, ds).iterator() for name, ds in datasets.items()}]
            # Train V2 configures one dataset per call; "val" as DataConfig.configure does
            # "train", but for equal=False.
            others = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                ds = self._whole("val", datasets["val"])
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i]["val"] = split
            return out

        def _whole(self, name, ds):
            """A copy of `ds` named and with its execution options, as DataConfig.configure makes."""
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            return ds

    return SplitValWhole(execution_options=execution_options)


def build_trainer(
    exp: ExperimentConfig,
    *,
    name: str,
    storage_path: str | None = None,
    callbacks: list | None = None,
    shards: tuple[str, str] | None = None,
    testing: TestingHooks | None = None,
    placement_strategy: str = "PACK",
):
    """TorchTrainer running `train_loop_per_worker` with this experiment's data, resources,
    checkpointing (best `keep_checkpoints` by val/AP, plus the latest) and failure handling.
    Re-running with the same name and storage resumes the run from its latest checkpoint.

    `shards`: the (train, val) shard locations when the caller has resolved them already (a
    sweep resolves them once for all its trials); default: resolve_shards(exp.data).
    `testing`: hooks for tests only (see detr_ray/testing_hooks.py)."""
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchTrainer

    from detr_ray.train.worker_run import RUN_KEY, WorkerRun, train_loop_per_worker

    t = exp.train
    storage_path = storage_path or default_storage()
    if not is_uri(storage_path):
        storage_path = os.path.abspath(storage_path)
    train_uri, val_uri = shards or resolve_shards(exp.data)
    augment = augment_recipe(exp.data, train_uri)
    needs = run_resources(exp)
    scaling = ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.gpus_per_worker > 0,
        resources_per_worker=needs.worker,
        placement_strategy=placement_strategy,
    )
    # Ray Data's own CPUs, capped so that runs sharing a cluster (a sweep) cannot starve each other.
    dataset_config = data_config(ExecutionOptions(resource_limits=ExecutionResources(cpu=needs.data_cpus)))
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=t.keep_checkpoints,
            checkpoint_score_attribute="checkpoint_score",
            checkpoint_score_order="max",
        ),
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        callbacks=callbacks,
    )
    run = WorkerRun(
        experiment=exp,
        train_uri=train_uri,
        val_uri=val_uri,
        tensorboard_dir=tensorboard_dir(storage_path, name) if t.tensorboard else None,
        testing=testing or TestingHooks(),
    )
    return TorchTrainer(
        train_loop_per_worker,
        # Ray declares train_loop_config a dict (and passes it through pickled as it is): the
        # typed WorkerRun rides in it under one key.
        train_loop_config={RUN_KEY: run},
        scaling_config=scaling,
        run_config=run_config,
        datasets=build_datasets(exp.data, train_uri, val_uri, augment, seed=t.seed),
        dataset_config=dataset_config,
    )
