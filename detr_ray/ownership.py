"""The rule for directories detr-ray fills on a user's behalf: it deletes or overwrites only what
it wrote and marked as its own.

Such a directory (the demo dataset's root, an evaluation report's output) gets a marker file,
`MARKER`, naming the part of detr-ray that made it. `claim(directory, owner)` creates and marks
a new or empty directory, or accepts one that `owner` already marked; a directory that holds
anything else (a user's files, or another tool's) is a `NotOwnedError` naming it, and nothing in
it is touched. Shard directories are recognised by their `_meta.json` and shard file names
instead (shards.write_shards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

MARKER = ".detr-ray-owner"


class NotOwnedError(RuntimeError):
    """A directory detr-ray would write into or delete from holds files it did not create."""


def owner(directory: str | Path) -> str | None:
    """The owner that the marker in `directory` names; None without a readable marker."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("owner") if isinstance(data, dict) else None


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def claim(directory: str | Path, owner_name: str, ignore: Iterable[str] = ()) -> Path:
    """Makes `directory` (a local path) `owner_name`'s: creates and marks it when it is missing
    or empty (entries named in `ignore` aside), accepts it when already marked so. Anything else
    is a NotOwnedError naming the directory and what is in it; nothing is written then."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    found = owner(path)
    if found == owner_name:
        return path
    entries = sorted(p.name for p in path.iterdir() if p.name not in set(ignore))
    if entries:
        what = (
            f"is marked as made by {found}"
            if found
            else f"holds files that detr-ray did not create ({_listing(entries)})"
        )
        raise NotOwnedError(
            f"{path}: {what}; refusing to write into it, nothing was changed. Choose a new or empty directory."
        )
    try:  # "x": of two processes claiming one empty directory, exactly one writes the marker
        with open(path / MARKER, "x") as f:
            json.dump({"owner": owner_name, "note": "written by detr-ray; it may replace what it wrote here"}, f)
    except FileExistsError:
        return claim(path, owner_name, ignore)
    return path


def remove_generated(root: Path, names: Iterable[str], generated: re.Pattern, refusal: str) -> None:
    """Deletes root/<name> for each of `names` (files or directories a generator wrote into a root
    it claimed) after checking that every path there, relative to root, matches `generated`.
    Anything else (a user's file, a symbolic link) is a NotOwnedError naming it plus `refusal`,
    and nothing is removed."""
    tops = [root / name for name in names]
    for top in tops:
        found = [top] if top.is_symlink() or top.is_file() else []
        if top.is_dir() and not top.is_symlink():
            found.append(top)
            for parent, dirs, files in os.walk(top):
                found += [Path(parent, name) for name in dirs + files]
        for path in found:
            if path.is_symlink() or not generated.fullmatch(path.relative_to(root).as_posix()):
                raise NotOwnedError(f"{path}: {refusal}")
    for top in tops:
        if top.is_dir():
            shutil.rmtree(top)
        elif top.exists():
            top.unlink()
