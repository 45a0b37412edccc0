"""The checkpoint directory format: save, verify, load.

A checkpoint is a directory:
    model.pt       model state dict (unwrapped from DDP)
    optimizer.pt   optimizer state dict
    scheduler.pt   learning-rate scheduler state dict
    scaler.pt      GradScaler state dict (fp16; empty otherwise)
    state.json     epoch, global step, full run config, category mapping, metrics
    MANIFEST.json  written last: format version and the SHA-256 and size of every file above

A directory without a manifest was never finished; one whose files do not match their hashes is
corrupt; a manifest that is not of this shape, or that names a file outside its directory, is
malformed. All are refused by `verify` (a CheckpointError, never another exception), which reads
local directories and pyarrow URIs (s3://, gs://, file://) alike, hashing every file wherever it is.
`latest_valid` falls back to the newest good checkpoint, `best_verified` to the next best one.
Tensors are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable

import pyarrow.fs as pafs
import torch
from torch import nn

from detr_ray.data import storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
STATE = "state.json"
TENSOR_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "scaler.pt")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, unfinished or corrupt. The message says which file."""


@dataclass
class TrainingState:
    """Everything a checkpoint holds besides tensors."""

    epoch: int  # the last completed epoch (0-based); training resumes at epoch + 1
    global_step: int
    config: dict
    categories: dict = field(default_factory=dict)  # label <-> category id mapping, names
    metrics: dict = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """write(tmp) then rename. An OSError (a full disk, say) is raised again naming the file, and the
    partial file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write checkpoint file {path}: {e.strerror or e}") from e
    os.replace(tmp, path)


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file object: on a full disk torch.save(obj, path) raises an opaque
    # RuntimeError ("unexpected pos ..."), while a file object's write raises OSError(ENOSPC).
    # torch's archive writer can still wrap that OSError in the same RuntimeError (when the disk
    # fills inside a record); the OSError is then the RuntimeError's context, and is what we raise.
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from e
            raise


def save(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    scaler: torch.amp.GradScaler | None,
    state: TrainingState,
) -> Path:
    """Writes a checkpoint into `directory` (created if needed); the manifest comes last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # an overwritten checkpoint is unfinished until done
    inner = getattr(model, "module", model)
    tensors = {
        "model.pt": inner.state_dict(),
        "optimizer.pt": optimizer.state_dict() if optimizer is not None else {},
        "scheduler.pt": scheduler.state_dict() if scheduler is not None else {},
        "scaler.pt": scaler.state_dict() if scaler is not None else {},
    }
    for name, obj in tensors.items():
        _write_atomic(directory / name, lambda p, obj=obj: _torch_save(obj, p))
    payload = {"format": FORMAT_VERSION, **state.__dict__}
    _write_atomic(directory / STATE, lambda p: p.write_text(json.dumps(payload, indent=2, default=float)))
    files = {
        name: {"sha256": _sha256(directory / name), "bytes": (directory / name).stat().st_size}
        for name in (*TENSOR_FILES, STATE)
    }
    manifest = {"format": FORMAT_VERSION, "files": files}
    _write_atomic(directory / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    return directory


def _check_name(manifest: str, name: str) -> None:
    """A manifest entry must be a relative path that stays inside the checkpoint directory."""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or ".." in parts:
        raise CheckpointError(f"{manifest}: entry {name!r} is not a file inside the checkpoint directory; refused")


def _read_manifest(directory: str | Path) -> dict:
    """The manifest of a checkpoint (local directory or URI), checked for shape only: a format
    this code reads, every required file listed with its sha256 and size, and no entry outside
    the directory. CheckpointError otherwise."""
    location = str(directory)
    fs, root = storage.resolve(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise CheckpointError(f"{location}: not a checkpoint directory")
    path = storage.join(location, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint was never completed") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: unreadable manifest: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(
            f"{path}: unreadable manifest: 'files' must map file names to {{sha256, bytes}}, got {files!r:.100}"
        )
    for name, meta in files.items():
        _check_name(path, name)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or type(meta.get("bytes")) is not int:
            raise CheckpointError(
                f"{path}: files[{name!r}]: expected {{'sha256': str, 'bytes': int}}, got {meta!r:.100}"
            )
    missing = [n for n in (*TENSOR_FILES, STATE) if n not in files]
    if missing:
        raise CheckpointError(f"{path}: manifest lacks {missing}")
    return manifest


def _stream_sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(directory: str | Path, expected: dict | None = None) -> dict:
    """Checks the manifest and every file's size and hash, on local disk or behind a URI;
    returns the manifest or raises CheckpointError. With `expected` (a manifest returned by an
    earlier verify), the checkpoint must also still be that one: same files, same hashes."""
    location = str(directory)
    manifest = _read_manifest(location)
    if expected is not None and manifest != expected:
        raise CheckpointError(
            f"{storage.join(location, MANIFEST)}: not the checkpoint verified earlier for this place "
            "(its manifest lists other files or hashes); refusing to use another checkpoint's weights"
        )
    fs, root = storage.resolve(location)
    real_root = os.path.realpath(root) if isinstance(fs, pafs.LocalFileSystem) else None
    for name, meta in manifest["files"].items():
        shown, path = storage.join(location, name), f"{root.rstrip('/')}/{name}"
        if real_root is not None and os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise CheckpointError(f"{shown}: a link to outside the checkpoint directory; refused")
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise CheckpointError(f"{shown}: listed in the manifest but missing")
        if info.size != meta["bytes"] or _stream_sha256(fs, path) != meta["sha256"]:
            raise CheckpointError(f"{shown}: contents do not match the manifest's hash (corrupt)")
    return manifest


@dataclass
class Loaded:
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    state: TrainingState
    path: Path


def load(directory: str | Path, expected: dict | None = None) -> Loaded:
    """Verifies (against `expected` too, see `verify`), then reads a local checkpoint (tensors
    on the CPU)."""
    directory = Path(directory)
    verify(directory, expected)
    tensors = {}
    for name in TENSOR_FILES:
        try:
            tensors[name] = torch.load(directory / name, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{directory / name}: cannot be read with weights_only=True: {e}") from e
    try:
        raw = json.loads((directory / STATE).read_text())
        raw.pop("format", None)
        state = TrainingState(**raw)
    except (ValueError, TypeError, AttributeError) as e:  # not an object, or other fields than TrainingState's
        raise CheckpointError(f"{directory / STATE}: not a training state: {e}") from e
    return Loaded(
        model=tensors["model.pt"],
        optimizer=tensors["optimizer.pt"],
        scheduler=tensors["scheduler.pt"],
        scaler=tensors["scaler.pt"],
        state=state,
        path=directory,
    )


def latest_valid(directories: Iterable[str | Path]) -> str | Path | None:
    """The newest verifiable checkpoint among `directories` (ordered oldest -> newest; local
    paths or URIs), skipping and logging unfinished or corrupt ones; None when there is none."""
    for d in reversed(list(directories)):
        try:
            verify(d)
            return d
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def best_verified(
    candidates: Iterable[tuple], mode: str, check: Callable[[str], Any] = verify
) -> tuple[tuple, Any] | None:
    """The best of `candidates`, (value, location, ...) tuples, that passes `check` (default:
    `verify`, hashes and all): best value first by `mode` ("max" or "min"), the next best when
    one fails with CheckpointError or OSError (logged). Returns (candidate, what `check`
    returned), or None. A value that is not a finite number never counts."""
    scored = [
        c for c in candidates if isinstance(c[0], (int, float)) and not isinstance(c[0], bool) and math.isfinite(c[0])
    ]
    scored.sort(key=lambda c: c[0], reverse=(mode == "max"))
    for candidate in scored:
        try:
            return candidate, check(candidate[1])
        except (CheckpointError, OSError) as e:
            log.warning("not using the checkpoint scored %s, trying the next best: %s", candidate[0], e)
    return None


# --------------------------------------------------------------------------------------------
# Choosing the best checkpoint: within a run, and among a sweep's trials


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
            candidates.append((json.loads(storage.read_bytes(storage.join(path, STATE)))["metrics"].get(metric), path))
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as e:  # unfinished or damaged: not a candidate
            log.warning("%s: unreadable %s, not a candidate: %s", path, STATE, e)
    chosen = best_verified(candidates, mode)
    if chosen is None:
        return None, None
    (value, path), _ = chosen
    return path, float(value)


def best_trial(trials: Iterable[dict], mode: str, check: Callable[[str], Any] = verify) -> tuple[dict, Any] | None:
    """The best of a sweep's trials (trials.json rows: "best" value, "checkpoint" location)
    whose checkpoint passes `check` (see best_verified), and what `check` returned; or None."""
    chosen = best_verified(
        [(t.get("best"), str(t["checkpoint"]), t) for t in trials if t.get("checkpoint")], mode, check
    )
    if chosen is None:
        return None
    (_, _, trial), checked = chosen
    return trial, checked
