"""The checkpoint directory format: save, verify, load.

A checkpoint is a directory:
    model.pt       model state dict (unwrapped from DDP)
    optimizer.pt   optimizer state dict
    scheduler.pt   learning-rate scheduler state dict
    scaler.pt      GradScaler state dict (fp16; empty otherwise)
    state.json     epoch, global step, full run config, category mapping, metrics
    MANIFEST.json  written last: format version and the SHA-256 and size of every file above

A directory without a manifest was never finished; one whose files do not match their hashes is
corrupt. Both are refused by `verify`, and `latest_valid` falls back to the newest good one.
Tensors are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

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
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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
        _write_atomic(directory / name, lambda p, obj=obj: torch.save(obj, p))
    payload = {"format": FORMAT_VERSION, **state.__dict__}
    _write_atomic(directory / STATE, lambda p: p.write_text(json.dumps(payload, indent=2, default=float)))
    files = {
        name: {"sha256": _sha256(directory / name), "bytes": (directory / name).stat().st_size}
        for name in (*TENSOR_FILES, STATE)
    }
    manifest = {"format": FORMAT_VERSION, "files": files}
    _write_atomic(directory / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    return directory


def verify(directory: str | Path) -> dict:
    """Checks the manifest and every file's size and hash; returns the manifest or raises."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint was never completed")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest: {e}") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    for name, meta in files.items():
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: contents do not match the manifest's hash (corrupt)")
    missing = [n for n in (*TENSOR_FILES, STATE) if n not in files]
    if missing:
        raise CheckpointError(f"{path}: manifest lacks {missing}")
    return manifest


@dataclass
class Loaded:
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    state: TrainingState
    path: Path


def load(directory: str | Path) -> Loaded:
    """Verifies, then reads a checkpoint (tensors on the CPU)."""
    directory = Path(directory)
    verify(directory)
    tensors = {}
    for name in TENSOR_FILES:
        try:
            tensors[name] = torch.load(directory / name, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{directory / name}: cannot be read with weights_only=True: {e}") from e
    raw = json.loads((directory / STATE).read_text())
    raw.pop("format", None)
    return Loaded(
        model=tensors["model.pt"],
        optimizer=tensors["optimizer.pt"],
        scheduler=tensors["scheduler.pt"],
        scaler=tensors["scaler.pt"],
        state=TrainingState(**raw),
        path=directory,
    )


def latest_valid(directories: Iterable[str | Path]) -> Path | None:
    """The newest verifiable checkpoint among `directories` (ordered oldest -> newest), skipping
    and logging unfinished or corrupt ones; None when there is none."""
    for d in reversed([Path(d) for d in directories]):
        try:
            verify(d)
            return d
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None
