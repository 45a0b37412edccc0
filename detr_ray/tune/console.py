"""What a sweep shows on its console, and where everything else goes.

The console (a terminal, or `ray job logs` on a cluster) carries what a person watches:
  - Tune's status table, with the searched parameters and the metrics that matter, printed when
    a trial starts or ends, so the last one is the final table (`SweepTable`);
  - one line per trial and epoch (`EpochLines`), the driver's counterpart of the line each run
    logs itself.
Ray's own messages stay out of it, and in the log files: the trials' processes (Train workers and
controllers, Ray Data's execution plans and progress, each `Reporting training result`, the runs'
own per-epoch lines) write to Ray's session logs, `<session_dir>/logs` (`ray_init_kwargs` stops
their copy to the driver; `log_locations` names the directory), and Tune writes each trial's
results to its directory in the sweep (result.json, progress.csv), named by trial id and searched
values (`trial_dirname`). Warnings and errors of the driver's Ray stay on the console.

Tune's default output engine ignores a progress reporter and prints every trial's whole config
(the fixed experiment included) when it starts, so `use_sweep_console` selects Tune's
reporter-driven engine (RAY_AIR_NEW_OUTPUT=0) unless the environment chose already. It also keeps
the raylet's worker-count warnings off the console (`hide_worker_count_warnings`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

from ray import tune

from detr_ray.tune.space import SearchSpace

log = logging.getLogger(__name__)

OUTPUT_ENGINE_ENV = "RAY_AIR_NEW_OUTPUT"
MAX_DIRNAME = 120  # well below file-name limits, with room for Tune's uniqueness suffix


def use_sweep_console() -> None:
    os.environ.setdefault(OUTPUT_ENGINE_ENV, "0")
    hide_worker_count_warnings()


def ray_init_kwargs() -> dict[str, Any]:
    """ray.init arguments of a sweep's driver: the trials' processes log to Ray's session logs
    only, and the driver's "ray" logger shows warnings and errors (its INFO lines are Ray's
    bookkeeping: the instance started, Tune's state files written)."""
    return {"log_to_driver": False, "logging_level": logging.WARNING}


WORKER_COUNT_WARNING = "the maximum expected startup concurrency"


def hide_worker_count_warnings() -> None:
    """The driver prints what the raylet reports to it; on a few cores a sweep's processes (trial
    drivers, Train controllers and workers, Ray Data tasks on fractional CPUs) always pass the
    raylet's startup concurrency (its CPU count), and it says so at each further multiple. That
    warning stays in the raylet's own log (raylet.out); every other report still reaches the
    console. A Ray without this function is left as it is."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "hides_worker_count", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        lines = [line for line in data.get("lines", []) if WORKER_COUNT_WARNING not in line]
        if lines:
            original({**data, "lines": lines}, *args, **kwargs)

    print_to_stdstream.hides_worker_count = True
    worker.print_to_stdstream = print_to_stdstream


def log_locations(context) -> str:
    """Where the logs that are not on the console are, from ray.init's context."""
    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    return f"{session}/logs" if session else "the Ray session's logs directory (/tmp/ray/session_latest/logs)"


def searched(space: SearchSpace) -> list[str]:
    """The parameters the search varies (not the constants of `by` entries)."""
    return [p.key for p in space.params if p.kind in ("loguniform", "uniform", "int", "choice")]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_name(trial) -> str:
    """A trial is called by its id, as in trials.json, best.json and runs/<trial id>."""
    return trial.trial_id


def trial_dirname(trial) -> str:
    """trial_<id>_<searched key>=<value>,...: the sampled values, never the fixed experiment."""
    values = ",".join(
        f"{k}={_short(v)}" for k, v in sorted(trial.config.items()) if not k.startswith("_") and not isinstance(v, dict)
    )
    name = f"trial_{trial.trial_id}" + (f"_{values}" if values else "")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:MAX_DIRNAME]


def metric_columns(space: SearchSpace) -> dict[str, str]:
    sched = space.scheduler
    columns = ["epoch", sched.metric, "val/AP50", *sched.objectives, "train/loss"]
    return {c: c for c in dict.fromkeys(columns)}


class SweepTable(tune.CLIReporter):
    """Tune's status table, printed when a trial starts or ends (not every few seconds: the
    per-epoch lines tell the progress in between), and at the end when the last one was cut."""

    def __init__(self, space: SearchSpace):
        super().__init__(
            parameter_columns={k: k for k in searched(space)},
            metric_columns=metric_columns(space),
            max_progress_rows=50,
            print_intermediate_tables=True,
            sort_by_metric=True,
            metric=space.scheduler.metric,
            mode=space.scheduler.mode,
        )
        self._shown: tuple = ()

    def should_report(self, trials, done: bool = False) -> bool:
        states = tuple((t.trial_id, t.status) for t in trials)
        if states != self._shown or (done and len(trials) > self._max_progress_rows):
            self._shown = states
            return True
        return False


class EpochLines(tune.Callback):
    """One log line per trial and epoch: the numbers the run's own per-epoch line has."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        def number(key: str) -> float:
            value = result.get(key)
            return float(value) if isinstance(value, (int, float)) else math.nan

        log.info(
            "trial %s epoch %s/%d: loss %.3f, val/AP %.3f, val/AP50 %.3f, %.1f images/s",
            trial.trial_id,
            result.get("epoch", "?"),
            self.epochs,
            number("train/loss"),
            number("val/AP"),
            number("val/AP50"),
            number("train/images_per_s"),
        )


def run_config_kwargs(space: SearchSpace, epochs: int, callbacks: list) -> dict[str, Any]:
    """RunConfig arguments: `callbacks` and the per-epoch lines, the table, and verbose=1 (Tune's
    legacy engine then prints no result dicts of its own)."""
    use_sweep_console()
    return {"callbacks": [*callbacks, EpochLines(epochs)], "progress_reporter": SweepTable(space), "verbose": 1}


def tune_config_kwargs() -> dict[str, Any]:
    return {"trial_name_creator": trial_name, "trial_dirname_creator": trial_dirname}
