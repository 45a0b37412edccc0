"""The sweep's Optuna study, kept in storage of its own: the dashboard's view of a running sweep,
the record of a finished one, and the seed of the next one's TPE.

Where it lives (`study_storage`):
    default     `<experiment dir>/optuna.journal`, an Optuna journal file next to the sweep.
    --study-storage a journal file path, or an RDB URL (sqlite:////abs/path.db, postgresql://...).
    A sweep on s3://, gs://... has no local directory to hold a journal: it needs
    --study-storage (an RDB URL, or a journal file on the driver's disk); nothing is guessed.

Who writes: only the Tune driver. The searcher (OptunaSearch) lives in the TuneController, in
the process that called `Tuner.fit()`; trial drivers and Train workers only report metrics to
it. So one process writes the study however many trials run, and the journal file (appends under
a lock file) is enough. An RDB is for what a local file cannot do: a dashboard or a later sweep
on another machine reading it, and many sweeps in one place.

The study is named after the sweep. Its trials carry the Tune trial id (user attribute
`tune_trial_id`); per-epoch values are Optuna intermediate values (single objective) or the
user attribute `history` (several objectives: Optuna has no intermediate values for those).
ASHA-stopped trials are PRUNED, errored ones FAIL, finished ones COMPLETE.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from detr_ray.data import storage
from detr_ray.tune.space import SearchSpace

log = logging.getLogger(__name__)

JOURNAL = "optuna.journal"
TUNE_ID = "tune_trial_id"
WARM_START = "warm_start_from"
URL_SCHEMES = ("sqlite://", "postgresql", "mysql", "oracle", "mssql")


class StudyError(ValueError):
    """The study's storage or a warm-start source cannot be used as asked."""


# --------------------------------------------------------------------------------------------
# Storage


def is_url(spec: str) -> bool:
    return spec.startswith(URL_SCHEMES)


def default_storage(experiment_dir: str, requested: str | None) -> str:
    """The study storage of the sweep at `experiment_dir`: `requested`, else the journal next to
    the sweep; refuses a sweep on remote storage without `requested`."""
    if requested:
        return requested if is_url(requested) else os.path.abspath(_local(requested))
    if storage.is_uri(experiment_dir) and not experiment_dir.startswith("file://"):
        raise StudyError(
            f"the sweep lives at {experiment_dir}, where no Optuna journal can be appended to: pass "
            "--study-storage, an RDB URL (postgresql://user@host/db, reachable from the driver) or a "
            "journal file on the driver's disk (/home/ray/studies/NAME.journal)"
        )
    return os.path.join(_local(experiment_dir), JOURNAL)


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """An RDB URL -> RDBStorage; anything else is a journal file path (created if missing), read
    and written as optuna-dashboard reads it."""
    if is_url(spec):
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = _local(spec)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def shown(spec: str) -> str:
    """`spec` without a password, for logs, trials.json and the README command."""
    if not is_url(spec):
        return spec
    from sqlalchemy.engine import make_url

    return make_url(spec).render_as_string(hide_password=True)


def dashboard_command(spec: str) -> str:
    return f"optuna-dashboard {shown(spec)}"


RECORD = "optuna_study.json"


def write_record(experiment_dir: str, spec: str, name: str) -> None:
    """Where a sweep's study is: {"storage": spec without a password, "study": name, "dashboard": command}."""
    payload = {"written_by": "detr-ray", "storage": shown(spec), "study": name, "dashboard": dashboard_command(spec)}
    storage.write_bytes_atomic(storage.join(experiment_dir, RECORD), json.dumps(payload, indent=2).encode())


def read_record(experiment_dir: str) -> dict | None:
    """The study record of the sweep at `experiment_dir`, with "spec": the storage to open (a
    journal moved with its sweep is found next to it); None for a sweep without a study."""
    try:
        record = json.loads(storage.read_bytes(storage.join(experiment_dir, RECORD)))
    except FileNotFoundError:
        return None
    spec = record["storage"]
    if not is_url(spec) and not os.path.isfile(_local(spec)):
        spec = os.path.join(_local(experiment_dir), JOURNAL)
    return {**record, "spec": spec}


# --------------------------------------------------------------------------------------------
# The space in Optuna's terms


def objectives(space: SearchSpace) -> dict[str, str]:
    """{metric: "max"|"min"}: the primary metric (ASHA's, the checkpoints') first."""
    return {space.scheduler.metric: space.scheduler.mode, **space.scheduler.objectives}


def directions(space: SearchSpace) -> list[str]:
    return ["maximize" if mode == "max" else "minimize" for mode in objectives(space).values()]


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """The Optuna distributions the sweep's searcher asks with (OptunaSearch's own conversion of
    the Tune domains, so that added trials and asked ones share one search space)."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch.convert_search_space(space.tune_domains())


def create_study(spec: str, name: str, space: SearchSpace) -> optuna.Study:
    """A new, empty study `name` in `spec`; refuses a name the storage already holds (another
    sweep's trials are never mixed into this one's)."""
    store = open_storage(spec)
    if name in {s.study_name for s in optuna.get_all_study_summaries(store)}:
        raise StudyError(
            f"{shown(spec)} already holds an Optuna study named {name!r} (another sweep's): choose another "
            "--name or --study-storage; to start from its trials, pass --warm-start instead"
        )
    study = optuna.create_study(storage=store, study_name=name, directions=directions(space))
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard labels its axes with
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives(space)))
    return study


def load(spec: str, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=open_storage(spec))
    except KeyError as e:
        raise StudyError(f"{shown(spec)} holds no Optuna study named {name!r}") from e


# --------------------------------------------------------------------------------------------
# Warm start


@dataclass
class WarmStart:
    source: str  # storage spec, as shown
    study: str
    used: list[FrozenTrial] = field(default_factory=list)  # ready for Study.add_trials
    ignored: list[tuple[int, str]] = field(default_factory=list)  # (trial number, why)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "study": self.study,
            "used": [t.user_attrs[WARM_START] for t in self.used],
            "ignored": [{"trial": n, "why": why} for n, why in self.ignored],
        }


def resolve_source(source: str, study_name: str | None = None) -> tuple[str, str]:
    """(storage spec, study name) of a warm-start source: an experiment directory (its
    journal), a journal file or an RDB URL. A storage with several studies needs `study_name`."""
    spec = source
    if not is_url(source):
        path = _local(source)
        if os.path.isdir(path):
            record = read_record(path)
            if record is None:
                raise StudyError(f"{path}: no {RECORD}: not a sweep with an Optuna study")
            spec = record["spec"]
            if "***" in spec:
                raise StudyError(f"{path}: its study is in {spec}: pass that URL, with its password, to --warm-start")
            study_name = study_name or record["study"]
        elif not os.path.isfile(path):
            raise StudyError(f"{source}: neither a sweep directory, a journal file nor an RDB URL")
    names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(spec))]
    if study_name is None:
        if len(names) != 1:
            raise StudyError(
                f"{shown(spec)} holds {len(names)} studies ({', '.join(names) or 'none'}): name one with "
                "--warm-start-study"
            )
        study_name = names[0]
    if study_name not in names:
        raise StudyError(f"{shown(spec)} holds no study named {study_name!r}; it has: {', '.join(names) or 'none'}")
    return spec, study_name


def _why_outside(key: str, value: Any, dist: BaseDistribution) -> str | None:
    if isinstance(dist, CategoricalDistribution):
        return (
            None
            if value in dist.choices
            else f"different choice set: {key}={value!r} is not among {list(dist.choices)}"
        )
    try:
        inside = dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        inside = False
    if inside:
        return None
    return f"param outside range: {key}={value!r} outside [{dist.low}, {dist.high}]"


def warm_start(source: str, space: SearchSpace, study_name: str | None = None) -> WarmStart:
    """The earlier study's trials whose results apply to `space`, as trials of the new study
    (same parameter names and distributions, their values and intermediate values), and the rest
    with the reason each is left out. COMPLETE and PRUNED trials count (TPE ranks pruned trials
    by how far they got); FAIL and unfinished ones have no result."""
    spec, name = resolve_source(source, study_name)
    old = load(spec, name)
    new_dists = distributions(space)
    wanted = list(objectives(space))
    fixed = space.fixed.to_dict()
    out = WarmStart(shown(spec), name)
    old_names = old.metric_names or [f"objective {i}" for i in range(len(old.directions))]
    if old_names != wanted or old.directions != [
        optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
        for d in directions(space)
    ]:
        why = (
            f"different objectives: {old_names} ({[d.name.lower() for d in old.directions]}) "
            f"vs this sweep's {wanted} ({directions(space)})"
        )
        out.ignored = [(t.number, why) for t in old.trials]
        return out
    for t in old.trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            out.ignored.append(
                (t.number, "failed" if t.state == TrialState.FAIL else f"no result ({t.state.name.lower()})")
            )
            continue
        why = None
        for key, dist in new_dists.items():
            if key not in t.params:
                why = f"missing param: {key} was not searched in that study"
                break
            why = _why_outside(key, t.params[key], dist)
            if why:
                break
        for key in sorted(set(t.params) - set(new_dists)):
            if why:
                break
            section, _, field_name = key.partition(".")
            now = fixed.get(section, {}).get(field_name, "<not a setting here>")
            if now != t.params[key]:
                why = f"{key}={t.params[key]!r} there, but this sweep fixes it to {now!r}"
        if why:
            out.ignored.append((t.number, why))
            continue
        out.used.append(
            optuna.trial.create_trial(
                state=t.state,
                values=t.values if t.state == TrialState.COMPLETE else None,
                params={k: t.params[k] for k in new_dists},
                distributions=new_dists,
                intermediate_values=dict(t.intermediate_values),
                user_attrs={
                    WARM_START: f"{name}#{t.number}",
                    **{k: v for k, v in t.user_attrs.items() if k == "history"},
                },
            )
        )
    return out


def seed(study: optuna.Study, warm: WarmStart) -> None:
    """Adds the warm-start trials to `study` (before the sweep asks for its first trial)."""
    study.add_trials(warm.used)
    log.info(
        "warm start from %s (study %s): %d trials added, %d ignored",
        warm.source,
        warm.study,
        len(warm.used),
        len(warm.ignored),
    )
    for number, why in warm.ignored:
        log.info("  trial %d ignored: %s", number, why)
