"""What one trial holds and how many trials a cluster runs at once.

The driver holds a tiny CPU fraction (and the head's `sweep_driver` resource when the cluster
has one, so drivers never live on spot workers); the Train workers and Ray Data ask for their
own resources, and Ray Data is capped per run (DataConfig.ray_data_cpus), so
`max_concurrent_trials` runs always fit the cluster at once: a sweep cannot deadlock on its own
decode tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from detr_ray.config import ExperimentConfig
from detr_ray.train.trainer import run_resources

DRIVER_CPUS = 0.01  # a trial's driver only waits on its TorchTrainer
DRIVER_RESOURCE = "sweep_driver"  # custom resource of the nodes that may host drivers (cluster.yaml: the head)


class SweepError(RuntimeError):
    """The sweep cannot run as configured (resources, metric, storage)."""


@dataclass(frozen=True)
class TrialNeeds:
    cpus: float  # driver + Train workers + Ray Data cap
    gpus: float
    worker: dict[str, float]  # one Train worker's bundle
    driver: dict[str, float]  # the trial driver's bundle


def trial_needs(experiment: ExperimentConfig, cluster: dict[str, float]) -> TrialNeeds:
    run = run_resources(experiment)
    driver = {"CPU": DRIVER_CPUS}
    if cluster.get(DRIVER_RESOURCE):
        driver[DRIVER_RESOURCE] = 0.01
    return TrialNeeds(cpus=run.cpus + DRIVER_CPUS, gpus=run.gpus, worker=run.worker, driver=driver)


def max_concurrent_trials(cluster: dict[str, float], needs: TrialNeeds) -> int:
    """How many trials the cluster holds at once (0: not even one)."""
    fits = [math.floor(cluster.get("CPU", 0.0) / needs.cpus + 1e-9)]
    if needs.gpus:
        fits.append(math.floor(cluster.get("GPU", 0.0) / needs.gpus + 1e-9))
    return max(0, min(fits))


def plan_concurrency(cluster: dict[str, float], needs: TrialNeeds, requested: int | None = None) -> int:
    """Trials at once: `requested` (an autoscaling cluster may grow into it), else as many as
    the cluster holds now. Refuses a sweep in which not one trial fits, before anything starts."""
    if requested is not None:
        if requested < 1:
            raise SweepError(f"max concurrent trials must be >= 1, got {requested}")
        return requested
    fits = max_concurrent_trials(cluster, needs)
    if fits < 1:
        have = f"{cluster.get('CPU', 0.0):g} CPUs and {cluster.get('GPU', 0.0):g} GPUs"
        raise SweepError(
            f"one trial needs {needs.cpus:g} CPUs and {needs.gpus:g} GPUs (workers {needs.worker}, "
            f"plus Ray Data and the driver) but the cluster has {have}: lower train.num_workers, "
            "train.cpus_per_worker, data.ray_data_cpus or the GPUs per trial, or pass --max-concurrent for a "
            "cluster that autoscales"
        )
    return fits
