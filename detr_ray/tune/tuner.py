"""The sweep: Ray Tune over DETR training runs, Optuna (TPE) proposing, ASHA stopping.

Ray 2.60 (Train V2) pattern: a trial is `trial_driver`, a function that builds the trial's
TorchTrainer with `TuneReportCallback` and calls fit. The driver holds a tiny CPU fraction (and
the head's `sweep_driver` resource when the cluster has one, so drivers never live on spot
workers); the Train workers and Ray Data ask for their own resources, and Ray Data is capped per
run (DataConfig.cpus), so `max_concurrent_trials` runs always fit the cluster at once: a sweep
cannot deadlock on its own decode tasks.

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
import math
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any

from optuna.samplers import TPESampler
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from detr_ray import pareto, relaunch
from detr_ray.config import ConfigError, experiment_from_dict
from detr_ray.data import storage
from detr_ray.train import checkpoint as ckpt
from detr_ray.train.trainer import run_resources
from detr_ray.tune.space import SearchSpace, apply_sample
from detr_ray.tune import console, study
from detr_ray.tune.scheduler import RungKeepingASHA, asha_with_state
from detr_ray.tune.study import TUNE_ID, open_storage

log = logging.getLogger(__name__)

DRIVER_CPUS = 0.01  # a trial's driver only waits on its TorchTrainer
DRIVER_RESOURCE = "sweep_driver"  # custom resource of the nodes that may host drivers (cluster.yaml: the head)
EXPERIMENT_KEY = "_experiment"  # fixed entries of a trial's config that are not hyperparameters
RUNS_KEY = "_runs_storage"
RELEASE_GRACE_S = 20.0  # how long Ray may take to remove a finished trial's placement groups
FORCE_STOP_S = "10"  # Tune kills a trial's actor this long after asking it to stop (Ray's default: 600)


class SweepError(RuntimeError):
    """The sweep cannot run as configured (resources, metric, storage)."""


# --------------------------------------------------------------------------------------------
# The trial


def trial_driver(config: dict[str, Any]) -> None:
    """Tune trainable: one trial is one TorchTrainer run of the sampled experiment."""
    import ray.tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from detr_ray.train.trainer import build_trainer

    experiment = apply_sample(config[EXPERIMENT_KEY], sample_of(config))
    trial_id = ray.tune.get_context().get_trial_id()
    DataContext.get_current().enable_progress_bars = False  # many trials' bars would bury Tune's table
    trainer = build_trainer(experiment, name=trial_id, storage_path=config[RUNS_KEY], callbacks=[TuneReportCallback()])
    trainer.fit()


def sample_of(config: dict[str, Any]) -> dict[str, Any]:
    """The sampled hyperparameters of a trial's config (without the fixed entries)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class TrialNeeds:
    cpus: float  # driver + Train workers + Ray Data cap
    gpus: float
    worker: dict[str, float]  # one Train worker's bundle
    driver: dict[str, float]  # the trial driver's bundle


def trial_needs(experiment: dict, cluster: dict[str, float]) -> TrialNeeds:
    run = run_resources(experiment_from_dict(experiment))
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
            "train.cpus_per_worker, data.cpus or the GPUs per trial, or pass --max-concurrent for a "
            "cluster that autoscales"
        )
    return fits


# --------------------------------------------------------------------------------------------
# Tune plug-ins


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped early was PRUNED (its intermediate
    values kept), not COMPLETE with a truncated score, and reports intermediate values by epoch,
    which stays monotonic when a trial resumes after a restore.

    With `study_storage` (see detr_ray/tune/study.py) the study lives in that storage under
    `study_name`, and the searcher's saved state holds only the storage spec, the study name and
    the Optuna trial ids of Tune's trials: a restored sweep reopens the study there and goes on
    with the same trials. A trial the storage holds as RUNNING that the saved state does not know
    was proposed after the last saved experiment state; Tune forgets that trial too, so it is
    marked FAIL (user attribute `lost_in_restore`) instead of staying RUNNING forever.

    Several objectives (`objectives`, besides `metric`): Optuna keeps no intermediate values for
    those, so the per-epoch values go to the trial's user attribute `history`; ASHA stops trials
    on `metric` alone and they are told PRUNED like single-objective ones."""

    def __init__(self, *, metric: str, mode: str, seed: int, max_epochs: int, startup_trials: int = 10,
                 objectives: dict[str, str] | None = None, study_storage: str | None = None, study_name: str | None = None):
        objectives = dict(objectives or {})
        super().__init__(
            metric=[metric, *objectives] if objectives else metric,
            mode=[mode, *objectives.values()] if objectives else mode,
            sampler=TPESampler(seed=seed, n_startup_trials=startup_trials),
            study_name=study_name,
        )
        self.primary = metric
        self.max_epochs = max_epochs
        self.study_storage = study_storage
        self.reported: dict[str, set[int]] = {}  # trial id -> epochs already told to Optuna
        self.histories: dict[str, list[dict]] = {}  # several objectives: trial id -> per-epoch values

    def _setup_study(self, mode):
        if self.study_storage is not None:
            self._storage = open_storage(self.study_storage)
        super()._setup_study(mode)

    def suggest(self, trial_id: str):
        new = trial_id not in self._ot_trials
        params = super().suggest(trial_id)
        if new and self.study_storage is not None:
            self._ot_trials[trial_id].set_user_attr(TUNE_ID, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or self.primary not in result or trial_id not in self._ot_trials:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        seen = self.reported.setdefault(trial_id, set())
        if step in seen:  # a resumed trial may repeat an epoch's result
            return
        seen.add(step)
        if isinstance(self.metric, list):
            history = self.histories.setdefault(trial_id, [])
            history.append({"epoch": step, **{m: result.get(m) for m in self.metric}})
            self._ot_trials[trial_id].set_user_attr("history", history)
        else:
            self._ot_trials[trial_id].report(result[self.metric], step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)  # logs the repeat
        if trial_id not in self._ot_trials:
            return
        if result and not error:  # Tune does not pass a result that stops a trial to on_trial_result
            self.on_trial_result(trial_id, result)
        ran = int((result or {}).get("epoch", 0))
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if not error and result and ran >= self.max_epochs and any(result.get(m) is None for m in metrics):
            log.error("trial %s finished without reporting %s: told FAIL", trial_id, [m for m in metrics if result.get(m) is None])
            error, result = True, None
        if error or not result or self.primary not in result or ran >= self.max_epochs:
            return super().on_trial_complete(trial_id, None if error else result, error)
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    # Tune pickles the searcher into tuner.pkl and, with every experiment state, into
    # searcher-state-*.pkl. With a storage, what is pickled is where the study is, not the study.
    def __getstate__(self):
        state = self.__dict__.copy()
        if state.get("study_storage") is not None:
            state["_storage"] = None
            state["_ot_study"] = None
            state["_ot_trials"] = {t: ot._trial_id for t, ot in self._ot_trials.items()}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if state.get("study_storage") is not None and state.get("_ot_trials"):
            self._reopen()

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if isinstance(state, dict):
            self.__setstate__(state)
        else:
            super().restore(checkpoint_path)

    def _reopen(self) -> None:
        import optuna

        self._storage = open_storage(self.study_storage)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler,
                                           pruner=optuna.pruners.NopPruner())
        known = dict(self._ot_trials)
        self._ot_trials = {t: optuna.trial.Trial(self._ot_study, i) for t, i in known.items() if t not in self._completed_trials}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in known.values():
                log.warning("Optuna trial %d (Tune trial %s) was proposed after the last saved sweep state and is lost "
                            "with the restore: marked FAIL", frozen.number, frozen.user_attrs.get(TUNE_ID))
                self._storage.set_trial_user_attr(frozen._trial_id, "lost_in_restore", True)
                self._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)


class PlacementGroupWatch(tune.Callback):
    """Makes sure each finished trial's Train placement groups are removed.

    A Train worker group's placement group lives until its controller removes it or the job
    ends; when a trial is stopped (ASHA) or killed, only Ray Train's PlacementGroupCleaner
    removes it, and that cleaner depends on the state API (it can be missing, or slow on a busy
    machine). A placement group left behind holds its GPUs, and later trials wait for them
    forever. So: rank 0 reports its placement group id with every result (a worker group
    restarted after a failure has a new one, so all are remembered); RELEASE_GRACE_S after a
    trial ends (Tune has killed its actor, and with it the Train controller, by then), every one
    still there is logged as an error, removed, and recorded in
    `<experiment>/leaked_placement_groups.json`."""

    def __init__(self, experiment_dir: str) -> None:
        self.record = storage.join(experiment_dir, "leaked_placement_groups.json")
        self.groups: dict[str, set[str]] = {}
        self.pending: list[tuple[float, str, str]] = []  # (deadline, trial id, group id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        pg = result.get("run/placement_group")
        if pg:
            self.groups.setdefault(trial.trial_id, set()).add(pg)

    def finished(self, trial_id: str, groups: set[str] | None = None) -> None:
        deadline = time.time() + RELEASE_GRACE_S
        groups = set(groups or ()) | self.groups.pop(trial_id, set())
        self.pending += [(deadline, trial_id, pg) for pg in sorted(groups)]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        self.check()

    def check(self, wait: bool = False) -> list[dict]:
        """Removes the overdue placement groups (with `wait`: waits for every pending one's
        deadline first); returns the ones it had to remove."""
        still, leaked = [], []
        for deadline, trial_id, pg in sorted(self.pending):
            while wait and _placement_group_alive(pg) and time.time() < deadline:
                time.sleep(0.5)
            if not _placement_group_alive(pg):
                continue
            if time.time() < deadline:
                still.append((deadline, trial_id, pg))
                continue
            log.error(
                "LEAK: trial %s ended %.0f s ago and Ray still holds its Train placement group %s; "
                "removing it so that later trials get its resources", trial_id, RELEASE_GRACE_S, pg,
            )
            _remove_placement_group(pg)
            leaked.append({"trial": trial_id, "placement_group": pg})
        self.pending = still
        if leaked:
            storage.write_bytes_atomic(self.record, json.dumps(read_leaks(self.record) + leaked, indent=2).encode())
        return leaked


def read_leaks(record: str) -> list[dict]:
    try:
        return json.loads(storage.read_bytes(record))
    except FileNotFoundError:
        return []


def _placement_group_alive(pg_id: str) -> bool:
    from ray.util import placement_group_table

    info = placement_group_table().get(pg_id)
    return bool(info) and info.get("state") not in ("REMOVED", None)


def _remove_placement_group(pg_id: str) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    except Exception as e:  # noqa: BLE001 - report and carry on; the summary records the leak
        log.error("could not remove placement group %s: %s", pg_id, e)


def live_placement_groups() -> list[dict]:
    """Placement groups that still hold (or wait for) resources on the cluster."""
    from ray.util import placement_group_table

    return [
        {"id": pid, "state": info.get("state"), "bundles": info.get("bundles")}
        for pid, info in placement_group_table().items()
        if info.get("state") not in ("REMOVED",)
    ]


# --------------------------------------------------------------------------------------------
# The Tuner


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
    exp = experiment_from_dict(space.experiment)
    if exp.train.eval_every != 1:
        raise ConfigError(
            f"{space.source}: experiment.train.eval_every must be 1 in a sweep (ASHA compares "
            f"{space.scheduler.metric} at every epoch), got {exp.train.eval_every}"
        )
    if not space.scheduler.metric.startswith("val/"):
        raise ConfigError(f"{space.source}: scheduler.metric must be a validation metric (val/...), got {space.scheduler.metric!r}")


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
    lie inside `space` (study.warm_start); a restored sweep keeps the study it has."""
    import ray

    check_space(space)
    # A stopped trial's driver is blocked in fit() and never stops by itself: have Tune kill it.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", FORCE_STOP_S)
    exp_dir = experiment_dir(storage_path, name)
    root = exp_dir.rsplit("/", 1)[0] if storage.is_uri(exp_dir) else os.path.dirname(exp_dir)
    cluster = ray.cluster_resources()
    needs = trial_needs(space.experiment, cluster)
    concurrency = plan_concurrency(cluster, needs, max_concurrent)
    trainable = tune.with_resources(trial_driver, needs.driver)
    watch = PlacementGroupWatch(exp_dir)
    shown = console.run_config_kwargs(space, experiment_from_dict(space.experiment).train.epochs, callbacks=[watch])
    run_config = tune.RunConfig(name=name, storage_path=root, **shown)

    if tune.Tuner.can_restore(exp_dir):
        if not resume:
            raise SweepError(f"{exp_dir} already holds a sweep; resume it or choose another --name")
        space = relaunch.check_sweep(exp_dir, space, as_stored=as_stored)
        recorded = study.read_record(exp_dir)
        if warm_start:
            raise SweepError(f"{exp_dir} already holds a sweep, which keeps its own study: --warm-start seeds a new sweep (choose another --name)")
        if study_storage and (recorded is None or study.shown(study.default_storage(exp_dir, study_storage)) != recorded["storage"]):
            raise SweepError(f"{exp_dir}: the sweep's Optuna study is in {recorded['storage'] if recorded else 'its pickled searcher state'}, "
                             f"not {study.shown(study_storage)}: a restored sweep continues its own study (drop --study-storage)")
        log.info("restoring the sweep at %s", exp_dir)
        tuner = tune.Tuner.restore(
            exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
        )
        return Sweep(tuner, space, exp_dir, True, concurrency, watch, **(
            {"study_storage": recorded["spec"], "study_name": recorded["study"]} if recorded else {}))
    if storage.exists(exp_dir):
        raise SweepError(f"{exp_dir} exists but is not a restorable sweep; choose another --name")
    if as_stored:
        raise SweepError(f"{relaunch.AS_STORED_FLAG}: there is no sweep at {exp_dir} to resume")

    if search not in ("optuna", "random"):
        raise SweepError(f"search: choose optuna or random, got {search!r}")
    sched = space.scheduler
    epochs = experiment_from_dict(space.experiment).train.epochs
    spec, warm = None, None
    if search == "optuna":
        try:
            spec = study.default_storage(exp_dir, study_storage)
            warm = study.warm_start(warm_start, space, warm_start_study) if warm_start else None
            ot_study = study.create_study(spec, name, space)
        except study.StudyError as e:
            raise SweepError(str(e)) from e
        if warm is not None:
            study.seed(ot_study, warm)
        search_alg = PruningOptunaSearch(
            metric=sched.metric, mode=sched.mode, seed=sched.seed, max_epochs=epochs, startup_trials=sched.startup_trials,
            objectives=sched.objectives, study_storage=spec, study_name=name,
        )
        log.info("Optuna study %r in %s; watch it with: %s", name, study.shown(spec), study.dashboard_command(spec))
    elif warm_start or study_storage or sched.objectives:
        raise SweepError("--warm-start, --study-storage and several objectives need the Optuna search")
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=sched.seed, max_concurrent=concurrency)
    if early_stopping:
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
    else:
        from ray.tune.schedulers import FIFOScheduler

        scheduler = FIFOScheduler()
    param_space = {**space.tune_domains(), EXPERIMENT_KEY: space.experiment, RUNS_KEY: storage.join(exp_dir, "runs")}
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



# --------------------------------------------------------------------------------------------
# Results


HISTORY_PREFIXES = ("train/", "val/", "model/")
HISTORY_KEYS = ("epoch", "lr", "lr_backbone", "time_this_iter_s", "time_total_s")  # times: the report's compute spent


def _status(result, ran: int, epochs: int) -> str:
    if result.error is not None:
        return "error"
    return "completed" if ran >= epochs else "stopped early (ASHA)"


def best_checkpoint(run_dir: str, metric: str, mode: str) -> tuple[str | None, float | None]:
    """A Train run's best checkpoint that verifies (every file's hash, on any storage), by the
    metric its own state.json recorded (the run directory is the record: Tune may have missed a
    run's last report). The claimed values only order the candidates: the chosen checkpoint's
    state.json is among the files verified, so its value is the one it was saved with."""
    candidates = []
    for name in storage.list_dirs(run_dir):
        path = storage.join(run_dir, name)
        if not name.startswith("checkpoint_"):
            continue
        try:
            candidates.append((json.loads(storage.read_bytes(storage.join(path, ckpt.STATE)))["metrics"].get(metric), path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # unfinished or damaged: not a candidate
            log.warning("%s: unreadable %s, not a candidate: %s", path, ckpt.STATE, e)
    chosen = ckpt.best_verified(candidates, mode)
    if chosen is None:
        return None, None
    (value, path), _ = chosen
    return path, float(value)


def summarize(results, space: SearchSpace) -> tuple[list[dict], dict | None]:
    """Per trial: id, sampled config, best metric, epochs run, why it stopped, its best verified
    checkpoint, the nodes of its rank 0 and its per-epoch history; and the best trial (None
    when no trial has a verified checkpoint)."""
    metric, mode = space.scheduler.metric, space.scheduler.mode
    epochs = experiment_from_dict(space.experiment).train.epochs
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    rows, best = [], None
    for result in results:
        config = result.config or {}
        df = result.metrics_dataframe
        row = {
            "trial": None,
            "config": sample_of(config),
            "best": None,
            "epochs": 0,
            "status": "error" if result.error is not None else "no result",
            "checkpoint": None,
            "nodes": [],
            "history": [],
        }
        if df is not None and not df.empty and "trial_id" in df:
            row["trial"] = str(df["trial_id"].iloc[-1])
        elif (result.metrics or {}).get("trial_id"):  # a trial that failed before reporting
            row["trial"] = str(result.metrics["trial_id"])
        if df is not None and not df.empty and "epoch" in df and metric in df:
            df = df.sort_values("epoch").drop_duplicates("epoch", keep="last")
            row["epochs"] = int(df["epoch"].max())
            row["status"] = _status(result, row["epochs"], epochs)
            if "run/node_id" in df:
                row["nodes"] = sorted({str(n) for n in df["run/node_id"].dropna() if n})
            columns = [c for c in df.columns if c in HISTORY_KEYS or c.startswith(HISTORY_PREFIXES)]
            row["history"] = json.loads(df[columns].to_json(orient="records"))
        if row["trial"] and RUNS_KEY in config:
            row["checkpoint"], row["best"] = best_checkpoint(storage.join(config[RUNS_KEY], row["trial"]), metric, mode)
        if row["best"] is None and row["history"]:  # no checkpoint left: the best reported value
            values = [h[metric] for h in row["history"] if isinstance(h.get(metric), (int, float))]
            row["best"] = (max if mode == "max" else min)(values) if values else None
        if space.scheduler.objectives:  # every objective at the trial's best checkpoint's epoch
            row["values"] = {metric: row["best"], **{m: best_row_value(row, metric, m) for m in space.scheduler.objectives}}
        rows.append(row)
        if row["checkpoint"] and (best is None or better(row["best"], best["best"])):
            best = row
    return rows, best


def best_row_value(row: dict, metric: str, key: str) -> float | None:
    """`key` (e.g. val/AP50) at the epoch of the trial's history closest to its best `metric`."""
    epochs = [h for h in row["history"] if isinstance(h.get(metric), (int, float)) and h.get(key) is not None]
    if not epochs or row["best"] is None:
        return None
    return min(epochs, key=lambda h: abs(h[metric] - row["best"]))[key]


def pareto_front(rows: list[dict], space: SearchSpace) -> list[dict]:
    """Several objectives: the trials that ran all their epochs, have a verified checkpoint and
    that no other such trial beats in every objective (ASHA-stopped trials did not finish: their
    values are not comparable)."""
    finished = [r for r in rows if r["checkpoint"] and r["status"] == "completed" and r.get("values")]
    return pareto.front(finished, study.objectives(space))


def write_summary(sweep: Sweep, rows: list[dict], best: dict | None, data: dict[str, str]) -> dict[str, str]:
    """Writes trials.json (and best.json when a best trial exists: with several objectives, the
    Pareto front as a list); returns their locations."""
    space = sweep.space
    common = {"metric": space.scheduler.metric, "mode": space.scheduler.mode}
    scheduler = sweep.scheduler
    run = run_resources(experiment_from_dict(space.experiment))
    trials = {
        **common,
        "objectives": study.objectives(space),
        "search": {p.key: {p.kind: p.args} for p in space.params},
        "epochs": experiment_from_dict(space.experiment).train.epochs,
        "resources": {"gpus_per_trial": run.gpus, "cpus_per_trial": run.cpus},
        "study": {"storage": study.shown(sweep.study_storage), "name": sweep.study_name,
                  "dashboard": study.dashboard_command(sweep.study_storage)} if sweep.study_storage else None,
        "warm_start": sweep.warm.describe() if sweep.warm is not None else None,
        # ASHA's records (rungs: [[milestone epoch, {trial: value there}], ...] per bracket) for the report
        "asha": {**scheduler.get_state(), "metric": space.scheduler.metric, "reduction_factor": scheduler._reduction_factor,
                 "max_t": scheduler._max_t} if scheduler is not None else None,
        "leaked_placement_groups": read_leaks(sweep.watch.record),
        "trials": rows,
    }
    out = {"trials": storage.join(sweep.experiment_dir, "trials.json")}
    storage.write_bytes_atomic(out["trials"], json.dumps(trials, indent=2, default=str).encode())

    def entry(row: dict) -> dict:
        return {
            **common,
            "trial": row["trial"],
            "value": row["best"],
            **({"values": row["values"]} if "values" in row else {}),
            "config": row["config"],
            "experiment": apply_sample(space.experiment, row["config"]),
            "checkpoint": row["checkpoint"],
            "data": data,
        }

    payload = None
    if space.scheduler.objectives:
        members = pareto_front(rows, space)
        payload = [entry(r) for r in members] if members else None
    elif best is not None:
        payload = entry(best)
    if payload is not None:
        out["best"] = storage.join(sweep.experiment_dir, "best.json")
        storage.write_bytes_atomic(out["best"], json.dumps(payload, indent=2, default=str).encode())
    return out
