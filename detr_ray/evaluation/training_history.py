"""What evaluation knows of how a target was trained: its run's per-epoch history (the run's
TensorBoard scalars in <run>/tensorboard, every epoch, if present, else the metrics stored in the
run's kept checkpoints) and, for a sweep, which hyperparameters mattered.

`parameter_importances` rebuilds an Optuna study from trials.json and asks Optuna which
hyperparameters mattered (its default evaluator, PED-ANOVA in Optuna 5; fANOVA would need
scikit-learn).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

from detr_ray import checkpoint as ckpt

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Training history of a run


def _tensorboard_scalars(path: Path) -> dict[int, dict[str, float]]:
    """step -> {tag: value} from one TensorBoard event file (TFRecord framing of Event protos)."""
    from tensorboardX.proto import event_pb2

    out: dict[int, dict[str, float]] = {}
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        record = data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4
        if len(record) < length:
            break  # a file still being written
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(int(event.step), {})[value.tag] = float(value.simple_value)
    return out


def run_history(checkpoint_dir: Path) -> list[dict]:
    """Per-epoch metrics of the run a checkpoint belongs to (see the module docstring)."""
    run_dir = Path(checkpoint_dir).parent
    by_epoch: dict[int, dict] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        try:
            for step, scalars in _tensorboard_scalars(events).items():
                by_epoch.setdefault(step, {}).update(scalars)
        except Exception as e:  # a damaged event file only loses the curves
            log.warning("%s: cannot read TensorBoard scalars: %s", events, e)
    if not by_epoch:
        for state_file in sorted(run_dir.glob(f"checkpoint_*/{ckpt.STATE}")):
            try:
                state = json.loads(state_file.read_text())
                by_epoch[int(state["epoch"])] = {
                    k: v for k, v in state.get("metrics", {}).items() if isinstance(v, (int, float))
                }
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable: %s", state_file, e)
    return [{"epoch": epoch, **{k: v for k, v in m.items() if k != "epoch"}} for epoch, m in sorted(by_epoch.items())]


# --------------------------------------------------------------------------------------------
# Optuna parameter importances


def _distribution(spec: Any, key: str):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"trials.json: search.{key}: expected {{distribution: args}}, got {spec!r}")
    ((kind, args),) = spec.items()
    if kind == "loguniform":
        return FloatDistribution(float(args[0]), float(args[1]), log=True)
    if kind == "uniform":
        return FloatDistribution(float(args[0]), float(args[1]))
    if kind == "int":
        return IntDistribution(int(args[0]), int(args[1]))
    if kind == "choice":
        return CategoricalDistribution(list(args))
    if kind in ("fixed", "by"):  # not a dimension of its own: a constant, or follows a choice
        return None
    raise ValueError(f"trials.json: search.{key}: unknown distribution {kind!r}")


def parameter_importances(subject) -> dict[str, float] | str:
    """{parameter: importance} (summing to 1) of an evaluation target's sweep (its `trials`,
    `search` and `mode`: subject.EvaluationTarget), or a sentence saying why there are none."""
    import warnings

    import optuna
    from optuna.importance import get_param_importances

    if not subject.trials:
        return "no trials.json: not a sweep"
    try:
        distributions = {k: d for k, spec in subject.search.items() if (d := _distribution(spec, k)) is not None}
    except (TypeError, ValueError, IndexError) as e:
        return f"search space unreadable: {e}"
    if not distributions:
        return "no tuned parameters in the search space"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    finished = []
    for t in subject.trials:
        value, config = t.get("best"), t.get("config") or {}
        if (
            not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not all(k in config for k in distributions)
        ):
            continue
        try:
            finished.append(
                optuna.trial.create_trial(
                    params={k: config[k] for k in distributions}, distributions=distributions, value=float(value)
                )
            )
        except (ValueError, TypeError) as e:
            log.warning("trial %s left out of the importances: %s", t.get("trial"), e)
    if len(finished) < 2:
        return f"not enough trials ({len(finished)} finished with a value; 2 needed)"
    try:
        study = optuna.create_study(direction="maximize" if subject.mode == "max" else "minimize")
        study.add_trials(finished)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importances = get_param_importances(study)
        for w in caught:
            log.warning("parameter importances: %s", w.message)
    except Exception as e:  # optuna refuses degenerate studies in several ways
        return f"not enough trials to estimate importances ({type(e).__name__}: {e})"
    return {k: float(v) for k, v in importances.items()}
