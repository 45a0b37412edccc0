"""A relaunch under an existing name runs what that run or sweep was started with, or nothing.

A training run (`scripts/train.py`) or a sweep (`scripts/tune.py`) resumes when launched again
with the same name and storage, and what resumes is the configuration it started with: the
optimizer state brings the old learning rate back, and a restored Tune sweep keeps its pickled
search space, scheduler and fixed experiment. So each records its configuration as JSON in its
directory when it starts (`detr_ray_run.json`, `detr_ray_sweep.json`), and a relaunch is
compared with that record:

- the same configuration: resume;
- a training run whose only difference is a larger `train.epochs`: resume and continue to the
  new number of epochs (the record is updated). Not a sweep: Tune keeps ASHA's max_t and the
  trials' experiment from the first launch;
- anything else (fewer epochs included): refused with a RelaunchError that lists each differing
  key (stored -> requested) and the two ways on: a new name, or `--resume-as-stored`, which
  resumes with the recorded configuration, whatever this launch asked (the differences it
  ignores are logged).

The records are detr-ray's own (each says so inside); a file of that name that is not one is
never read as one nor overwritten. A run started before records were kept is compared with the
configuration stored in its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from detr_ray.config import ConfigError, ExperimentConfig, experiment_from_dict
from detr_ray.data import storage

log = logging.getLogger(__name__)

RUN_RECORD = "detr_ray_run.json"
SWEEP_RECORD = "detr_ray_sweep.json"
WRITER = "detr-ray"
FORMAT = 1
GROWABLE = "train.epochs"  # the one key a training run's relaunch may change (upwards only)
AS_STORED_FLAG = "--resume-as-stored"


class RelaunchError(ConfigError):
    """A launch asks for something other than what the existing run or sweep of its name holds."""


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists and empty mappings are values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(stored: dict, requested: dict) -> list[tuple[str, Any, Any]]:
    """(key, stored value, requested value) of every dotted key whose values differ, sorted;
    ABSENT stands for a key one side lacks."""
    old, new = flatten(_plain(stored)), flatten(_plain(requested))
    return [
        (k, old.get(k, ABSENT), new.get(k, ABSENT))
        for k in sorted(old.keys() | new.keys())
        if not _same(old.get(k, ABSENT), new.get(k, ABSENT))
    ]


def _same(a: Any, b: Any) -> bool:
    """Equal values; 1 and 1.0 are the same number, True and 1 are not the same setting."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return (numbers or type(a) is type(b)) and a == b


def _plain(config: dict) -> dict:
    """As JSON gives it back (tuples become lists), so a record compares equal to its source."""
    return json.loads(json.dumps(config, default=str))


def format_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in diffs)


# --------------------------------------------------------------------------------------------
# Records


def read_record(directory: str, filename: str) -> dict | None:
    """The configuration recorded in `directory`, None when there is no record."""
    location = storage.join(directory, filename)
    try:
        record = json.loads(storage.read_bytes(location))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RelaunchError(
            f"{location}: not a configuration record written by detr-ray ({e}); left as it is: move it away or choose "
            "another name"
        ) from e
    if not isinstance(record, dict) or record.get("written_by") != WRITER or not isinstance(record.get("config"), dict):
        raise RelaunchError(
            f"{location}: not a configuration record written by detr-ray; left as it is: move it away or choose "
            "another name"
        )
    return record["config"]


def write_record(directory: str, filename: str, config: dict) -> None:
    """Records `config`, replacing only a record detr-ray wrote."""
    read_record(directory, filename)  # raises on a file that is not ours
    payload = {"written_by": WRITER, "format": FORMAT, "config": _plain(config)}
    storage.write_bytes_atomic(
        storage.join(directory, filename), json.dumps(payload, indent=2, sort_keys=True).encode()
    )


def _refusal(what: str, location: str, diffs: list, note: str = "") -> RelaunchError:
    return RelaunchError(
        f"{location} holds a {what} started with another configuration; this launch differs in "
        f"(stored -> requested):\n{format_differences(diffs)}\nNothing was started. Either choose a new "
        f"--name for a separate {what} with this configuration, or pass {AS_STORED_FLAG} to resume "
        f"the {what} with its stored configuration (the differences above are then ignored).{note}"
    )


# --------------------------------------------------------------------------------------------
# Training runs


@dataclass
class RunPlan:
    experiment: ExperimentConfig  # what to run
    action: str  # "start" | "resume" | "continue" | "resume as stored"
    message: str  # one line for the user


def _checkpoint_config(run_dir: str) -> dict | None:
    """The experiment stored in the newest checkpoint of a run that has no record."""
    from detr_ray import checkpoint as ckpt

    for name in reversed([n for n in storage.list_dirs(run_dir) if n.startswith("checkpoint_")]):
        try:
            config = json.loads(storage.read_bytes(storage.join(run_dir, name, ckpt.STATE))).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config, dict):
            return config
    return None


def plan_run(run_dir: str, experiment: ExperimentConfig, *, as_stored: bool = False) -> RunPlan:
    """Checks a training launch against the run already at `run_dir` (if any), records the
    configuration that will run there, and says what will happen. RelaunchError: refused."""
    requested = experiment.to_dict()
    stored = read_record(run_dir, RUN_RECORD)
    source = storage.join(run_dir, RUN_RECORD)
    if stored is None:
        stored = _checkpoint_config(run_dir)
        source = f"{run_dir} (newest checkpoint)"
    if stored is None:
        if as_stored:
            raise RelaunchError(f"{AS_STORED_FLAG}: there is no run at {run_dir} to resume")
        write_record(run_dir, RUN_RECORD, requested)
        return RunPlan(experiment, "start", f"starting run {run_dir}")
    stored_exp = experiment_from_dict(stored, source)
    diffs = differences(stored_exp.to_dict(), requested)
    if as_stored:
        if diffs:
            log.warning(
                "%s: resuming with the stored configuration; this launch's differences are ignored:\n%s",
                run_dir,
                format_differences(diffs),
            )
        plan = RunPlan(stored_exp, "resume as stored", f"resuming run {run_dir} with its stored configuration")
    elif not diffs:
        plan = RunPlan(experiment, "resume", f"resuming run {run_dir} (same configuration)")
    elif [d[0] for d in diffs] == [GROWABLE] and diffs[0][2] > diffs[0][1]:
        plan = RunPlan(
            experiment, "continue", f"resuming run {run_dir}: continuing to {diffs[0][2]} epochs (was {diffs[0][1]})"
        )
    else:
        note = (
            f" Only {GROWABLE} may change on a relaunch, and only upwards (the run then continues to the new number)."
        )
        raise _refusal("run", run_dir, diffs, note)
    write_record(run_dir, RUN_RECORD, plan.experiment.to_dict())
    return plan


# --------------------------------------------------------------------------------------------
# Sweeps


def sweep_config(space) -> dict:
    """What a sweep runs: its fixed experiment, its search space and its scheduler, in the
    layout of a search-space YAML (so that a record parses back into the same space)."""
    return {
        "experiment": space.experiment,
        "search": {p.key: {p.kind: p.args} for p in space.params},
        "scheduler": dataclasses.asdict(space.scheduler),
    }


def _comparable(space) -> dict:
    config = sweep_config(space)
    config["experiment"] = space.fixed.to_dict()  # defaults filled in, types fixed
    return config


def record_sweep(exp_dir: str, space) -> None:
    """Records a new sweep's configuration in its experiment directory."""
    write_record(exp_dir, SWEEP_RECORD, sweep_config(space))


def check_sweep(exp_dir: str, space, *, parse, as_stored: bool = False):
    """The search space a restored sweep at `exp_dir` runs with: `space` when it is the stored
    one, the stored one with `as_stored`; RelaunchError otherwise. `parse(raw, where)` reads the
    stored record back into a search space (tune.space.parse_space: the sweep's schema lives
    with the sweep, above this module)."""
    stored = read_record(exp_dir, SWEEP_RECORD)
    if stored is None:
        if as_stored:
            log.warning(
                "%s has no %s (a sweep of an older detr-ray): restoring it as Tune stored it; its "
                "summary uses this launch's search space",
                exp_dir,
                SWEEP_RECORD,
            )
            return space
        raise RelaunchError(
            f"{exp_dir} holds a sweep without {SWEEP_RECORD} (started by an older detr-ray), so this launch "
            "cannot be checked against it: choose a new --name, "
            f"or pass {AS_STORED_FLAG} to restore it as Tune stored it"
        )
    stored_space = parse(stored, storage.join(exp_dir, SWEEP_RECORD))
    diffs = differences(_comparable(stored_space), _comparable(space))
    if not diffs:
        return space
    if as_stored:
        log.warning(
            "%s: restoring with the stored configuration; this launch's differences are ignored:\n%s",
            exp_dir,
            format_differences(diffs),
        )
        return stored_space
    raise _refusal(
        "sweep",
        exp_dir,
        diffs,
        " A sweep's configuration cannot change on a restore (Tune keeps its search space and scheduler).",
    )
