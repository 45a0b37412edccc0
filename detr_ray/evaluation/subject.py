"""What gets evaluated: a checkpoint, the best checkpoint of a tuning experiment, or a COCO
results file of another detector; with what is known about how it was trained.

An experiment directory (local or a pyarrow URI), as written by detr_ray/tune/summary.py:

    best.json    {"metric": "val/AP", "mode": "max", "trial": id, "value": float,
                  "config": {sampled hyperparameters, "train.lr": ...},
                  "experiment": {the full experiment dict}, "checkpoint": dir or URI,
                  "data": {"train": shards, "val": shards}}
    trials.json  {"metric", "mode", "search": {the search space's 'search' section},
                  "trials": [{"trial", "config", "best", "epochs", "status", "checkpoint",
                              "history": [{"epoch": 1, "train/loss": ..., "val/AP": ...}, ...]}]}

best.json names the checkpoint; without it, or when that checkpoint does not verify, the best
trial of trials.json whose checkpoint verifies is taken. A checkpoint is verified against its
manifest when it is chosen (a URI's after it is copied, each URI into a folder of its own), and
again when it is loaded for scoring, against the manifest recorded then (`EvaluationTarget.manifest`).

A published DETR file (the reference repository's layout: {"model": state dict}, such as
detr-r50-e632da11.pth, or its training checkpoint.pth with "args"; a local file, an http(s) URL
or a storage URI) is scored as the model it was trained as: the architecture is inferred from the
state dict (weights.infer_model_config), the class head mapped to the val data's categories
(weights.load_pretrained), and the result saved as a detr-ray checkpoint under the work
directory, so that inference runs it like any other. Its identity is the file's sha256 (a URI is
fetched into a folder of its own first); the report records it with the load report (which
classes mapped by id, by name, or are new).

Training history and parameter importances: training_history.py. Every kind of target is read
here, in one module (about 480 lines), because evaluate.py, --compare and serving
(serve/model.py) must choose and verify a checkpoint through the same functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detr_ray import checkpoint as ckpt
from detr_ray.config import ConfigError, experiment_from_dict
from detr_ray.data import storage
from detr_ray.evaluation.training_history import run_history

log = logging.getLogger(__name__)

BEST = "best.json"
TRIALS = "trials.json"


class EvaluationTargetError(ValueError):
    """What was asked to evaluate cannot be used. The message names the file and field."""


@dataclass
class EvaluationTarget:
    """One thing evaluate.py scores (see the module docstring), with what is known of its training."""

    name: str  # a short label (report title, --compare column)
    kind: str  # "checkpoint" | "experiment" | "results" | "published"
    source: str  # what the user gave
    checkpoint: Path | None = None  # local, verified checkpoint directory
    manifest: dict | None = None  # the checkpoint's manifest as verified: what is scored must match it
    results_file: Path | None = None  # kind "results"
    val: str | None = None  # the val shards it was trained with (default data)
    experiment: dict | None = None  # the full experiment config
    trial: str | None = None
    metric: str = "val/AP"
    mode: str = "max"
    best_value: float | None = None
    hyperparameters: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # per epoch
    trials: list[dict] = field(default_factory=list)
    search: dict = field(default_factory=dict)
    weights: dict | None = None  # kind "published": sha256, inferred architecture, load report
    front: list[dict] = field(default_factory=list)  # several objectives: best.json's Pareto front
    choice: str | None = None  # the rule that chose this member of the front
    sweep: dict = field(default_factory=dict)  # trials.json without its trials (objectives, asha, study, ...)

    def describe(self) -> dict:
        """JSON-able summary for the report."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "results_file": str(self.results_file) if self.results_file else None,
            "val": self.val,
            "trial": self.trial,
            "metric": self.metric,
            "mode": self.mode,
            "best_value": self.best_value,
            **({"weights": self.weights} if self.weights else {}),
            **({"front": self.front, "choice": self.choice} if self.front else {}),
        }


# --------------------------------------------------------------------------------------------
# Reading


def _read_json(location: str) -> Any:
    try:
        return json.loads(storage.read_bytes(location).decode())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationTargetError(f"{location}: cannot read: {e}") from e
    except ValueError as e:
        raise EvaluationTargetError(f"{location}: not valid JSON: {e}") from e


def _field(doc: dict, key: str, types, where: str, required: bool = True):
    if key not in doc or doc[key] is None:
        if required:
            raise EvaluationTargetError(f"{where}: missing field {key!r}")
        return None
    value = doc[key]
    if not isinstance(value, types):
        raise EvaluationTargetError(f"{where}.{key}: expected {getattr(types, '__name__', types)}, got {value!r}")
    return value


def fetch_checkpoint(location: str, workdir: str | Path) -> tuple[Path, dict]:
    """(a verified local checkpoint directory, its manifest): `location` itself, or a copy of a
    URI's files under `workdir` in a folder of that URI's own (runs name their checkpoints alike:
    two runs' checkpoint_epoch0010 must not share one). CheckpointError when it is unfinished
    or corrupt."""
    if storage.is_uri(location):
        import pyarrow.fs as pafs

        fs, path = storage.resolve(location)
        key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
        local = Path(workdir) / "checkpoints" / f"{Path(path.rstrip('/')).name}-{key}"
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        directory = local
    else:
        directory = Path(location)
    return directory, ckpt.verify(directory)


def _checkpoint_state(directory: Path) -> dict:
    state = json.loads((directory / ckpt.STATE).read_text())
    if not isinstance(state, dict):
        raise EvaluationTargetError(f"{directory / ckpt.STATE}: expected a JSON object, got {type(state).__name__}")
    return state


def _val_from_config(config: dict, where: str) -> str:
    """The val shards a run's config points at (the demo's, generated if missing)."""
    from detr_ray.data.datasets import resolve_shards

    try:
        exp = experiment_from_dict(config, where)
    except ConfigError as e:
        raise EvaluationTargetError(str(e)) from e
    return resolve_shards(exp.data)[1]


def from_checkpoint(location: str, workdir: str | Path, name: str | None = None) -> EvaluationTarget:
    try:
        directory, manifest = fetch_checkpoint(location, workdir)
    except ckpt.CheckpointError as e:
        raise EvaluationTargetError(str(e)) from e
    state = _checkpoint_state(directory)
    config = state.get("config") or {}
    return EvaluationTarget(
        name=name or str(location).rstrip("/").rsplit("/", 1)[-1],  # the user's name, not the fetched copy's
        kind="checkpoint",
        source=str(location),
        checkpoint=directory,
        manifest=manifest,
        val=_val_from_config(config, f"{directory / ckpt.STATE}: config"),
        experiment=config,
        best_value=state.get("metrics", {}).get("val/AP"),
        history=run_history(directory),
    )


# --------------------------------------------------------------------------------------------
# Published DETR weights

PUBLISHED_SECTIONS = {"model", "data"}  # what --set may change of a published file's experiment


def is_weights_file(location: str) -> bool:
    """A DETR weights file rather than a checkpoint/experiment directory or a COCO results JSON:
    an http(s) URL, a storage URI naming a file, or a local file saved by torch.save (a zip
    archive or a pickle, never JSON)."""
    location = str(location)
    if location.startswith(("http://", "https://")):
        return True
    if storage.is_uri(location):
        import pyarrow.fs as pafs

        try:
            fs, path = storage.resolve(location)
            return fs.get_file_info(path).type == pafs.FileType.File
        except (OSError, ValueError):  # an unknown scheme, no access: not taken for weights here
            return False
    path = Path(location)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_weights(location: str, workdir: str | Path) -> Path:
    """A local copy of a weights file: `location` itself, or a URL's / URI's bytes in a folder
    of that location's own under `workdir` (files are published under the same names)."""
    location = str(location)
    if not location.startswith(("http://", "https://")) and not storage.is_uri(location):
        if not Path(location).is_file():
            raise EvaluationTargetError(f"{location}: no such file")
        return Path(location)
    name = location.rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    local = Path(workdir) / "weights" / key / name
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        if location.startswith(("http://", "https://")):
            import torch

            torch.hub.download_url_to_file(location, str(local), progress=False)
        else:
            local.write_bytes(storage.read_bytes(location))
    except Exception as e:  # HTTP errors, a missing object, a refused connection: say which file
        raise EvaluationTargetError(f"{location}: cannot fetch: {e}") from e
    return local


def from_published(
    location: str, workdir: str | Path, data: str | None, overrides: list[str] = (), name: str | None = None
) -> EvaluationTarget:
    """A published DETR file as a subject (module docstring). `data`: the val shards, whose
    categories the class head is mapped to; `overrides`: "model.key=value" / "data.key=value"
    settings the file cannot tell (e.g. model.dilation=true) or that replace inferred ones."""
    from detr_ray.config import apply_overrides
    from detr_ray.data.shards import read_meta
    from detr_ray.model import build_model
    from detr_ray.model.weights import WeightsError, infer_model_config, load_pretrained, read_reference_checkpoint

    location = str(location)
    if not data:
        raise EvaluationTargetError(
            f"{location}: a published checkpoint carries no val data; give the val shards (--data)"
        )
    local = fetch_weights(location, workdir)
    sha256 = _sha256_file(local)
    file_name = location.rstrip("/").rsplit("/", 1)[-1]
    try:
        given = apply_overrides({"model": {}, "data": {}}, list(overrides))
    except ConfigError as e:
        raise EvaluationTargetError(str(e)) from e
    unknown = sorted(set(given) - PUBLISHED_SECTIONS)
    if unknown:
        raise EvaluationTargetError(
            f"--set: only model.* and data.* apply to a published checkpoint, not {', '.join(unknown)}"
        )
    meta = read_meta(data)
    categories = list(zip(meta.label_to_category_id, meta.label_names))
    try:
        sd, args = read_reference_checkpoint(local)
        architecture = infer_model_config(sd, args=args, name=file_name, given=given["model"])
        # DETR's val transform (shortest side 800, longest <= 1333): the published figures' own.
        config = {
            "model": {**architecture, "num_classes": len(categories)},
            "data": {"augment": "coco", **given["data"]},
            "train": {"pretrained": location},
        }
        exp = experiment_from_dict(config, f"{location}: inferred experiment")
        model = build_model(exp.model)
        report = load_pretrained(model, local, categories=categories)
    except (WeightsError, ConfigError) as e:  # their messages name the file
        raise EvaluationTargetError(str(e)) from e
    if report.reinitialized:
        raise EvaluationTargetError(
            f"{location}: cannot be scored on {data}: it would run with freshly initialised "
            f"{', '.join(sorted(report.reinitialized))} ({'; '.join(report.reinitialized.values())})"
        )
    if report.new_classes:
        log.warning(
            "%s: categories %s of %s are not among its classes: their scores come from a freshly initialised row",
            location,
            [m.name for m in report.new_classes],
            data,
        )
    # A folder of its own per subject: the same file may be evaluated twice in one run (a new
    # class's row is random, so the two saved models can differ).
    root = Path(workdir) / "published"
    root.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{sha256[:16]}-", dir=root)) / "checkpoint"
    state = ckpt.TrainingState(
        epoch=0,
        global_step=0,
        config=exp.to_dict(),
        metrics={},
        categories={"label_to_category_id": meta.label_to_category_id, "names": meta.label_names},
    )
    ckpt.save(directory, model, None, None, None, state)
    return EvaluationTarget(
        name=name or file_name,
        kind="published",
        source=location,
        checkpoint=directory,
        manifest=ckpt.verify(directory),
        val=data,
        experiment=exp.to_dict(),
        weights={
            "sha256": sha256,
            "file": str(local),
            "architecture": architecture,
            "args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))},
            "load": {
                "summary": report.summary(),
                "loaded": len(report.loaded),
                "skipped": report.skipped,
                "reinitialized": report.reinitialized,
                "classes": [asdict(m) for m in report.classes],
            },
        },
    )


def subject_for_checkpoint(
    location: str, workdir: str | Path, data: str | None = None, overrides: list[str] = ()
) -> EvaluationTarget:
    """--checkpoint: a detr-ray checkpoint directory or a published DETR weights file."""
    if is_weights_file(location):
        return from_published(location, workdir, data, overrides)
    return from_checkpoint(location, workdir)


def from_results(path: str | Path, name: str | None = None) -> EvaluationTarget:
    """A COCO results JSON of any detector (checked against the ground truth when scored)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationTargetError(f"{path}: no such results file")
    return EvaluationTarget(name=name or path.stem, kind="results", source=str(path), results_file=path)


def _choose(best: Any, choose: str | None, objectives: dict[str, str], where: str) -> tuple[dict, list[dict]]:
    """(the chosen entry, the front) of best.json: a front (a list) needs a rule when it has more
    than one member; a single best (a dict) takes none."""
    from detr_ray import pareto

    if isinstance(best, dict):
        if choose:
            raise EvaluationTargetError(
                f"{where}: one best trial (a sweep of one objective): --choose applies to a Pareto front"
            )
        return best, []
    if (
        not isinstance(best, list)
        or not best
        or not all(isinstance(e, dict) and isinstance(e.get("values"), dict) for e in best)
    ):
        raise EvaluationTargetError(
            f"{where}: expected a JSON object, or a non-empty list of Pareto-front entries with 'values'"
        )
    if choose is None:
        if len(best) > 1:
            listed = "\n".join(
                f"  trial {e.get('trial')}: " + ", ".join(f"{k} {v}" for k, v in e["values"].items()) for e in best
            )
            raise EvaluationTargetError(
                f"{where}: a Pareto front of {len(best)} trials "
                f"({', '.join(f'{m} {d}' for m, d in objectives.items())}); "
                f'choose one with --choose, e.g. --choose "max {next(iter(objectives))}" or '
                f'--choose "max val/AP subject to model/parameters<=N":\n{listed}'
            )
        return best[0], best
    try:
        return pareto.choose(best, choose, objectives), best
    except pareto.RuleError as e:
        raise EvaluationTargetError(f"{where}: {e}") from e


def _read_sweep(location: str) -> tuple[Any, Any]:
    """(best.json, trials.json) of the sweep at `location`, each None when missing; neither:
    EvaluationTargetError."""
    docs = []
    for name in (BEST, TRIALS):
        try:
            docs.append(_read_json(storage.join(location, name)))
        except FileNotFoundError:
            docs.append(None)
    if docs == [None, None]:
        raise EvaluationTargetError(
            f"{location}: neither {BEST} nor {TRIALS} found; not an experiment directory "
            "(scripts/tune.py writes one; use --checkpoint for a single checkpoint)"
        )
    return docs[0], docs[1]


def _trials_record(trials_doc: Any, trials_loc: str, metric: str, mode: str) -> tuple[list[dict], dict, str, str]:
    """(trials, search, metric, mode) of trials.json, checked."""
    if not isinstance(trials_doc, dict):
        raise EvaluationTargetError(f"{trials_loc}: expected a JSON object, got {type(trials_doc).__name__}")
    trials = _field(trials_doc, "trials", list, trials_loc)
    for i, t in enumerate(trials):
        if not isinstance(t, dict) or "trial" not in t:
            raise EvaluationTargetError(f"{trials_loc}: trials[{i}]: expected an object with a 'trial' id")
    search = _field(trials_doc, "search", dict, trials_loc, required=False) or {}
    metric = _field(trials_doc, "metric", str, trials_loc, required=False) or metric
    mode = _field(trials_doc, "mode", str, trials_loc, required=False) or mode
    return trials, search, metric, mode


def from_experiment(
    location: str, workdir: str | Path, name: str | None = None, choose: str | None = None
) -> EvaluationTarget:
    """The best trial's best checkpoint of the sweep at `location`; with several objectives, the
    member of the Pareto front that `choose` (pareto.py's rule) picks."""
    location = str(location)
    best_loc, trials_loc = storage.join(location, BEST), storage.join(location, TRIALS)
    best, trials_doc = _read_sweep(location)
    trials, search, metric, mode = [], {}, "val/AP", "max"
    if trials_doc is not None:
        trials, search, metric, mode = _trials_record(trials_doc, trials_loc, metric, mode)

    chosen, front = None, []
    if best is None and choose:
        raise EvaluationTargetError(f"{location}: no {BEST}: no Pareto front to choose from")
    if best is not None:
        objectives = (trials_doc or {}).get("objectives") if isinstance(trials_doc, dict) else None
        best, front = _choose(best, choose, objectives or {metric: mode}, best_loc)
        ckpt_loc = _field(best, "checkpoint", str, best_loc)
        try:
            chosen = fetch_checkpoint(ckpt_loc, workdir)
        except ckpt.CheckpointError as e:
            if front:  # another trial would answer another rule: refuse instead
                raise EvaluationTargetError(
                    f"{best_loc}: the chosen trial {best.get('trial')}'s checkpoint: {e}"
                ) from e
            if trials_doc is None:
                raise EvaluationTargetError(f"{best_loc}.checkpoint: {e}") from e
            log.warning(
                "%s.checkpoint does not verify, taking the best trial of %s whose checkpoint does: %s",
                best_loc,
                TRIALS,
                e,
            )
    if chosen is not None:
        directory, manifest = chosen
        trial = str(_field(best, "trial", (str, int), best_loc))
        value = _field(best, "value", (int, float), best_loc, required=False)
        hyper = _field(best, "config", dict, best_loc, required=False) or {}
        experiment = _field(best, "experiment", dict, best_loc, required=False)
        data = _field(best, "data", dict, best_loc, required=False) or {}
        metric = _field(best, "metric", str, best_loc, required=False) or metric
        mode = _field(best, "mode", str, best_loc, required=False) or mode
        val = data.get("val")
        if val is not None and not isinstance(val, str):
            raise EvaluationTargetError(f"{best_loc}.data.val: expected a shard directory or URI, got {val!r}")
    else:
        directory, manifest, trial, value, hyper = _best_trial_checkpoint(trials, metric, mode, trials_loc, workdir)
        experiment, val = None, None
    state = _checkpoint_state(directory)
    experiment = experiment or state.get("config") or {}
    if not val:
        val = _val_from_config(experiment, f"{best_loc if chosen is not None else directory / ckpt.STATE}: experiment")
    record = next((t for t in trials if str(t["trial"]) == trial), None)
    history = (record or {}).get("history") or run_history(directory)
    return EvaluationTarget(
        name=name or f"{Path(location.rstrip('/')).name}:{trial}",
        kind="experiment",
        source=location,
        checkpoint=directory,
        manifest=manifest,
        val=val,
        experiment=experiment,
        trial=trial,
        metric=metric,
        mode=mode,
        best_value=value,
        hyperparameters=hyper or (record or {}).get("config") or {},
        history=history,
        trials=trials,
        search=search,
        front=front,
        choice=choose,
        sweep={k: v for k, v in trials_doc.items() if k != "trials"} if isinstance(trials_doc, dict) else {},
    )


def _best_trial_checkpoint(trials: list[dict], metric: str, mode: str, where: str, workdir) -> tuple:
    """(checkpoint dir, manifest, trial id, value, config) of the best trial whose checkpoint
    verifies."""
    chosen = ckpt.best_trial(trials, mode, check=lambda location: fetch_checkpoint(location, workdir))
    if chosen is None:
        raise EvaluationTargetError(f"{where}: no trial has a finite {metric!r} and a checkpoint that verifies")
    t, (directory, manifest) = chosen
    log.info("%s: best trial by %s with a verified checkpoint: %s (%s)", where, metric, t["trial"], t["best"])
    return directory, manifest, str(t["trial"]), float(t["best"]), t.get("config") or {}


def resolve(spec: str, workdir: str | Path, data: str | None = None, overrides: list[str] = ()) -> EvaluationTarget:
    """For --compare: a results .json file, an experiment directory, a checkpoint directory or a
    published DETR weights file (scored on `data`, with `overrides`: see from_published)."""
    if is_weights_file(spec):
        return from_published(spec, workdir, data, overrides)
    if not storage.is_uri(spec) and Path(spec).is_file():
        return from_results(spec)
    if storage.exists(storage.join(spec, BEST)) or storage.exists(storage.join(spec, TRIALS)):
        return from_experiment(spec, workdir)
    if storage.exists(storage.join(spec, ckpt.MANIFEST)) or storage.exists(storage.join(spec, ckpt.STATE)):
        return from_checkpoint(spec, workdir)
    raise EvaluationTargetError(
        f"{spec}: not a COCO results file, an experiment directory ({BEST}/{TRIALS}), a checkpoint directory "
        "or a DETR weights file"
    )
