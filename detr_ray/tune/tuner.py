"""The sweep: Ray Tune over DETR training runs, Optuna (TPE) proposing, ASHA stopping.

This module builds and restores a sweep (`build_sweep`). Its parts: trial.py (the trial's
driver function), resources.py (what a trial holds, how many fit), pruning.py (Optuna told of
ASHA's pruning), placement.py (the placement-group watch), summary.py (trials.json, best.json).

Layout of an experiment, `<storage>/<name>/`:
    <Tune's experiment state and trial directories (progress.csv, result.json, TensorBoard)>
    runs/<trial_id>/     the trial's Train run: checkpoint_epochNNNN/, tensorboard/
    trials.json          every trial: config, best metric, epochs, why it stopped, history
    best.json            the best trial, its config and its best verified checkpoint

A trial's Train run is named after the trial id, which survives a restore, so an unfinished trial
resumes from its own checkpoints. After every trial the placement groups of its Train workers
are checked: one Ray failed to release is reported loudly and removed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from ray import tune

from detr_ray import relaunch
from detr_ray.config import ConfigError
from detr_ray.data import storage
from detr_ray.tune import console, study

# A sweep's pickled state (tuner.pkl, searcher-state-*.pkl) may name these two classes as
# detr_ray.tune.tuner's: importing them here keeps such sweeps restorable.
from detr_ray.tune.placement import PlacementGroupWatch
from detr_ray.tune.pruning import PruningOptunaSearch
from detr_ray.tune.resources import SweepError, plan_concurrency, trial_needs
from detr_ray.tune.scheduler import RungKeepingASHA, asha_with_state
from detr_ray.tune.space import SearchSpace, parse_space
from detr_ray.tune.trial import EXPERIMENT_KEY, RUNS_KEY, SHARDS_KEY, trial_driver

log = logging.getLogger(__name__)

FORCE_STOP_S = "10"  # Tune kills a trial's actor this long after asking it to stop (Ray's default: 600)


@dataclass
class Sweep:
    """A ready-to-fit sweep: the Tuner, where it lives, and what it watches."""

    tuner: Any
    space: SearchSpace
    experiment_dir: str
    restored: bool
    concurrency: int
    watch: Any
    study_storage: str | None = None  # where the Optuna study is (None: random search, or a sweep older than studies)
    study_name: str | None = None
    warm: Any = None  # study.WarmStart of a warm-started sweep

    @property
    def scheduler(self):
        """The sweep's ASHA (a restored sweep's own, with its rungs) or None."""
        sched = getattr(getattr(getattr(self.tuner, "_local_tuner", None), "_tune_config", None), "scheduler", None)
        return sched if isinstance(sched, RungKeepingASHA) else None

    def fit(self):
        """Runs the sweep; afterwards checks that no trial's Train placement group remains."""
        results = self.tuner.fit()
        for result in results:  # also covers a restored sweep, whose watch is a stored copy
            df = result.metrics_dataframe
            if df is not None and "run/placement_group" in df and "trial_id" in df and not df.empty:
                groups = {g for g in df["run/placement_group"].dropna() if g}
                self.watch.finished(str(df["trial_id"].iloc[-1]), groups)
        self.watch.check(wait=True)
        return results


def experiment_dir(storage_path: str, name: str) -> str:
    if not storage.is_uri(storage_path):
        storage_path = os.path.abspath(storage_path)
    return storage.join(storage_path, name)


def check_space(space: SearchSpace) -> None:
    """What a sweep needs beyond a valid experiment: ASHA sees the metric every epoch."""
    exp = space.fixed
    if exp.train.eval_every != 1:
        raise ConfigError(
            f"{space.source}: experiment.train.eval_every must be 1 in a sweep (ASHA compares "
            f"{space.scheduler.metric} at every epoch), got {exp.train.eval_every}"
        )
    if not space.scheduler.metric.startswith("val/"):
        raise ConfigError(
            f"{space.source}: scheduler.metric must be a validation metric (val/...), got {space.scheduler.metric!r}"
        )


def build_sweep(
    space: SearchSpace,
    *,
    name: str,
    storage_path: str,
    resume: bool = True,
    max_concurrent: int | None = None,
    search: str = "optuna",
    early_stopping: bool = True,
    as_stored: bool = False,
    study_storage: str | None = None,
    warm_start: str | None = None,
    warm_start_study: str | None = None,
    shards: tuple[str, str] | None = None,
) -> Sweep:
    """The sweep `name` under `storage_path`. When it already exists and `resume` is set, it is
    restored: unfinished trials continue from their checkpoints, finished ones are kept, and the
    searcher's state (the Optuna study) carries on; an existing experiment is never overwritten.
    A new sweep records its search space, scheduler and fixed experiment; a restore whose `space`
    differs from that record is refused (relaunch.RelaunchError) unless `as_stored`, which
    restores the sweep with the recorded space (the returned Sweep's `space`).

    `search`: "optuna" (TPE) or "random" (Tune's random sampling, a baseline);
    `early_stopping`: ASHA, or every trial runs all its epochs (a baseline).

    The Optuna study lives in `study_storage` (default: the journal next to the sweep; see
    detr_ray/tune/study.py), named after the sweep, and a restore continues it (the storage a
    sweep started with is recorded in STUDY_RECORD; another one is refused). `warm_start`: a
    new sweep's study first gets the results of that earlier sweep's (or storage's) trials that
    lie inside `space` (study.warm_start); a restored sweep keeps the study it has.
    `shards`: the (train, val) shard locations every trial trains on, resolved once by the
    caller (default: each trial resolves its experiment's data itself)."""
    import ray

    check_space(space)
    # A stopped trial's driver is blocked in fit() and never stops by itself: have Tune kill it.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", FORCE_STOP_S)
    exp_dir = experiment_dir(storage_path, name)
    root = exp_dir.rsplit("/", 1)[0] if storage.is_uri(exp_dir) else os.path.dirname(exp_dir)
    cluster = ray.cluster_resources()
    needs = trial_needs(space.fixed, cluster)
    concurrency = plan_concurrency(cluster, needs, max_concurrent)
    trainable = tune.with_resources(trial_driver, needs.driver)
    watch = PlacementGroupWatch(exp_dir)
    shown = console.run_config_kwargs(space, space.fixed.train.epochs, callbacks=[watch])
    run_config = tune.RunConfig(name=name, storage_path=root, **shown)

    if tune.Tuner.can_restore(exp_dir):
        if not resume:
            raise SweepError(f"{exp_dir} already holds a sweep; resume it or choose another --name")
        return _restore(exp_dir, space, trainable, concurrency, watch, as_stored, study_storage, warm_start)
    if storage.exists(exp_dir):
        raise SweepError(f"{exp_dir} exists but is not a restorable sweep; choose another --name")
    if as_stored:
        raise SweepError(f"{relaunch.AS_STORED_FLAG}: there is no sweep at {exp_dir} to resume")

    sched = space.scheduler
    search_alg, spec, warm = _searcher(
        search, space, name, exp_dir, concurrency, study_storage, warm_start, warm_start_study
    )
    scheduler = _scheduler(space, early_stopping, run_config)
    param_space = {**space.tune_domains(), EXPERIMENT_KEY: space.experiment, RUNS_KEY: storage.join(exp_dir, "runs")}
    if shards is not None:
        param_space[SHARDS_KEY] = {"train": shards[0], "val": shards[1]}
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=sched.num_samples,
        max_concurrent_trials=concurrency,
        # A function trainable's actor would be cached for reuse with its trial's training thread
        # (the TorchTrainer) still running and holding its workers: a stopped trial must end.
        reuse_actors=False,
        **console.tune_config_kwargs(),
    )
    log.info("sweep %s: %d trials, up to %d at once, each holding %s", name, sched.num_samples, concurrency, needs)
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    relaunch.record_sweep(exp_dir, space)  # right after the Tuner wrote its state there: restorable from now on
    if spec is not None:
        study.write_record(exp_dir, spec, name)
    return Sweep(tuner, space, exp_dir, False, concurrency, watch, spec, name if spec else None, warm)


def _scheduler(space: SearchSpace, early_stopping: bool, run_config):
    """ASHA on the space's metric (its state saved through a callback added to `run_config`), or
    FIFO: every trial runs all its epochs."""
    if not early_stopping:
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    sched, epochs = space.scheduler, space.fixed.train.epochs
    # Tune does not save a scheduler's rungs; this pair saves them with the experiment state.
    scheduler, scheduler_state = asha_with_state(
        time_attr="epoch",
        max_t=epochs,
        grace_period=min(sched.grace_period, epochs),
        reduction_factor=sched.reduction_factor,
        metric=sched.metric,
        mode=sched.mode,
    )
    run_config.callbacks.append(scheduler_state)
    return scheduler


# The files Tune restores a sweep from (the newest of each kind): JSON, or pickles (whatever
# their suffix), which always end with pickle's STOP opcode.
_TUNE_STATE = (
    ("experiment_state-", "json"),
    ("search_gen_state-", "pickle"),
    ("searcher-state-", "pickle"),
    ("callback-states-", "pickle"),
    ("tuner.pkl", "pickle"),
)


def check_saved_state(exp_dir: str) -> None:
    """Refuses a sweep whose saved Tune state is incomplete. The driver writes that state to a
    staging directory and copies it to the storage in the background; a driver killed during the
    copy leaves a truncated file. Tune, failing to read it, logs an error and starts the whole
    sweep again from its first trial; this stops with the file named instead. Reads the files,
    never unpickles them."""
    names = storage.list_files(exp_dir)
    for prefix, kind in _TUNE_STATE:
        found = [n for n in names if n.startswith(prefix)]
        if not found:
            continue
        name = max(found)  # Tune reads the newest (names carry the session's start time)
        data = storage.read_bytes(storage.join(exp_dir, name))
        if kind == "json":
            try:
                json.loads(data)
                complete = True
            except ValueError:
                complete = False
        else:
            complete = data.endswith(b".")
        if not complete:
            raise SweepError(
                f"{storage.join(exp_dir, name)}: the sweep's saved state is incomplete ({len(data)} bytes; its "
                "driver was probably stopped while saving it). Tune would start the sweep over from its first "
                "trial instead of resuming it, so nothing is restored. Start a new sweep under another --name, "
                "or put back a complete copy of this file (the driver's staging copy is under the Ray session's "
                "artifacts directory on the node that ran it)."
            )


def _restore(
    exp_dir: str,
    space: SearchSpace,
    trainable,
    concurrency: int,
    watch,
    as_stored: bool,
    study_storage: str | None,
    warm_start: str | None,
) -> Sweep:
    """The sweep at `exp_dir` restored (see build_sweep), with its own study."""
    space = relaunch.check_sweep(exp_dir, space, parse=parse_space, as_stored=as_stored)
    recorded = study.read_record(exp_dir)
    if warm_start:
        raise SweepError(
            f"{exp_dir} already holds a sweep, which keeps its own study: --warm-start seeds a new sweep (choose "
            "another --name)"
        )
    if study_storage and (
        recorded is None or study.shown(study.default_storage(exp_dir, study_storage)) != recorded["storage"]
    ):
        raise SweepError(
            f"{exp_dir}: the sweep's Optuna study is in "
            f"{recorded['storage'] if recorded else 'its pickled searcher state'}, "
            f"not {study.shown(study_storage)}: a restored sweep continues its own study (drop --study-storage)"
        )
    check_saved_state(exp_dir)
    log.info("restoring the sweep at %s", exp_dir)
    tuner = tune.Tuner.restore(
        exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
    )
    return Sweep(
        tuner,
        space,
        exp_dir,
        True,
        concurrency,
        watch,
        **({"study_storage": recorded["spec"], "study_name": recorded["study"]} if recorded else {}),
    )


def _searcher(
    search: str,
    space: SearchSpace,
    name: str,
    exp_dir: str,
    concurrency: int,
    study_storage: str | None,
    warm_start: str | None,
    warm_start_study: str | None,
) -> tuple[Any, str | None, Any]:
    """(Tune's search algorithm, the Optuna study's storage spec or None, the warm start or None)
    of a new sweep."""
    sched = space.scheduler
    if search not in ("optuna", "random"):
        raise SweepError(f"search: choose optuna or random, got {search!r}")
    if search == "random":
        if warm_start or study_storage or sched.objectives:
            raise SweepError("--warm-start, --study-storage and several objectives need the Optuna search")
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sched.seed, max_concurrent=concurrency), None, None
    try:
        spec = study.default_storage(exp_dir, study_storage)
        warm = study.warm_start(warm_start, space, warm_start_study) if warm_start else None
        ot_study = study.create_study(spec, name, space)
    except study.StudyError as e:
        raise SweepError(str(e)) from e
    if warm is not None:
        study.seed(ot_study, warm)
    search_alg = PruningOptunaSearch(
        metric=sched.metric,
        mode=sched.mode,
        seed=sched.seed,
        max_epochs=space.fixed.train.epochs,
        startup_trials=sched.startup_trials,
        objectives=sched.objectives,
        study_storage=spec,
        study_name=name,
    )
    log.info("Optuna study %r in %s; watch it with: %s", name, study.shown(spec), study.dashboard_command(spec))
    return search_alg, spec, warm
