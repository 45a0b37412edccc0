"""Optuna inside Tune: the search algorithm that tells Optuna which trials ASHA pruned, and keeps
the study in storage of its own across restores."""

from __future__ import annotations

import logging
import pickle

from optuna.samplers import TPESampler
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from detr_ray.tune.study import TUNE_ID, open_storage

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        seed: int,
        max_epochs: int,
        startup_trials: int = 10,
        objectives: dict[str, str] | None = None,
        study_storage: str | None = None,
        study_name: str | None = None,
    ):
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
            log.error(
                "trial %s finished without reporting %s: told FAIL",
                trial_id,
                [m for m in metrics if result.get(m) is None],
            )
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
        self._ot_study = optuna.load_study(
            study_name=self._study_name, storage=self._storage, sampler=self._sampler, pruner=optuna.pruners.NopPruner()
        )
        known = dict(self._ot_trials)
        self._ot_trials = {
            t: optuna.trial.Trial(self._ot_study, i) for t, i in known.items() if t not in self._completed_trials
        }
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in known.values():
                log.warning(
                    "Optuna trial %d (Tune trial %s) was proposed after the last saved sweep state and is lost "
                    "with the restore: marked FAIL",
                    frozen.number,
                    frozen.user_attrs.get(TUNE_ID),
                )
                self._storage.set_trial_user_attr(frozen._trial_id, "lost_in_restore", True)
                self._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
