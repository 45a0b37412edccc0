"""ASHA whose rung records survive a restored sweep.

Ray Tune 2.60 does not keep a scheduler's state: the experiment state it saves leaves the
scheduler out (`TuneController.__getstate__`), nothing calls `TrialScheduler.save`/`restore`,
and `Tuner.restore` brings back the scheduler as pickled in `tuner.pkl` when the sweep started,
with empty rungs. A restored ASHA therefore compares the next trials with nobody: a trial it
would have stopped at the first rung runs all its epochs.

What Tune does save with the experiment state, in the same step and next to the searcher's
state, is every callback's `get_state()` (`callback-states-*.pkl`), and on restore it calls
`set_state()` before re-adding the trials. `SchedulerState` is such a callback, holding the
scheduler: `tuner.pkl` pickles the scheduler and the callbacks together, so after a restore the
callback still holds the very scheduler the sweep runs with.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

log = logging.getLogger(__name__)


class RungKeepingASHA(ASHAScheduler):
    """ASHAScheduler with its bookkeeping as a plain dict: every bracket's rungs (milestone ->
    {trial id: recorded value}), which bracket each trial is in, how many it stopped."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._restored_brackets: dict[str, int] = {}

    def get_state(self) -> dict[str, Any]:
        index = {id(b): i for i, b in enumerate(self._brackets)}
        return {
            "rungs": [[[milestone, dict(recorded)] for milestone, recorded in b._rungs] for b in self._brackets],
            "trial_brackets": {**self._restored_brackets, **{t: index[id(b)] for t, b in self._trial_info.items()}},
            "num_stopped": self._num_stopped,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        saved = [[milestone for milestone, _ in rungs] for rungs in state["rungs"]]
        ours = [[milestone for milestone, _ in b._rungs] for b in self._brackets]
        if saved != ours:  # the sweep's own scheduler, unpickled from tuner.pkl: cannot differ
            raise ValueError(f"ASHA state of another configuration: rungs {saved}, this scheduler's {ours}")
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        self._restored_brackets = dict(state["trial_brackets"])
        self._num_stopped = state["num_stopped"]
        log.info(
            "ASHA restored: %d recorded results in %d rungs, %d trials stopped so far",
            sum(len(r) for _, r in self._brackets[0]._rungs),
            len(self._brackets[0]._rungs),
            self._num_stopped,
        )

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)  # assigns a bracket at random
        if trial.trial_id in self._restored_brackets:  # a restored trial stays in its own
            self._trial_info[trial.trial_id] = self._brackets[self._restored_brackets.pop(trial.trial_id)]


class SchedulerState(Callback):
    """Saves the scheduler's state with the experiment state; gives it back on restore."""

    def __init__(self, scheduler: RungKeepingASHA):
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.set_state(state["scheduler"])


def asha_with_state(**kwargs) -> tuple[RungKeepingASHA, SchedulerState]:
    """The scheduler (ASHAScheduler's arguments) and the callback that keeps its state: pass the
    first as TuneConfig(scheduler=...), the second among RunConfig(callbacks=[...])."""
    scheduler = RungKeepingASHA(**kwargs)
    return scheduler, SchedulerState(scheduler)
