"""Read and validate a COCO-format instances file; map category ids to contiguous labels.

`load_coco(path)` parses the JSON (a local path or a pyarrow filesystem URI such as s3://...)
and applies the validation rules of the shard writer:

- malformed JSON, a missing required key, a value of the wrong type or a duplicate id is a
  `CocoFormatError` naming the file, the list entry and the key;
- boxes with zero or negative width or height are dropped, boxes reaching outside the image are
  clipped to it (and dropped if nothing is left); annotations of unknown images or categories are
  dropped. Every drop and clip is counted by reason in `CocoDataset.dropped` / `.clipped`;
- images without annotations are kept (DETR learns "no object" from them);
- an image's `file_name` must be a relative path that stays inside the images directory
  (`unsafe_name`): an absolute path, a drive or URI, or a `..` component is a `CocoFormatError`.

Labels: the model sees contiguous labels 0..K-1; label i is the i-th category in ascending
category-id order (`CocoDataset.label_to_category_id[i]`). Ids at the boundary stay the
dataset's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from detr_ray.data.storage import read_bytes

logger = logging.getLogger(__name__)

# Reasons an annotation is dropped (keys of CocoDataset.dropped).
DROP_UNKNOWN_IMAGE = "unknown image_id"
DROP_UNKNOWN_CATEGORY = "unknown category_id"
DROP_DEGENERATE = "zero or negative box width/height"
DROP_OUTSIDE = "box entirely outside the image"


class CocoFormatError(ValueError):
    """The annotation file is not valid COCO. The message names the file, entry and key."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str = ""


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels, inside the image
    area: float
    iscrowd: bool


@dataclass
class CocoDataset:
    """A validated COCO split: images sorted by id, categories sorted by id, and the
    surviving annotations grouped by image id."""

    path: str
    sha256: str
    images: list[ImageRecord]
    categories: list[Category]
    annotations: dict[int, list[Annotation]]  # image_id -> annotations (may be missing = none)
    dropped: Counter = field(default_factory=Counter)  # reason -> number of annotations
    clipped: int = 0  # boxes clipped to their image
    num_source_annotations: int = 0

    @property
    def label_to_category_id(self) -> list[int]:
        return [c.id for c in self.categories]

    @property
    def num_annotations(self) -> int:
        return sum(len(a) for a in self.annotations.values())


def unsafe_name(name: str, uri: bool = False) -> str | None:
    """Why `name` (a path read from a file) may not be joined onto a directory, or None if it
    may: it must be a relative path that stays inside the directory on any platform and
    filesystem. A `..` component is refused even where it would lead back inside: resolved
    through a symbolic link it can lead anywhere. `uri`: the directory is a URI (s3://...),
    where pyarrow reads `%` as an escape (`%2F..`), `?` as options (another endpoint) and `#`."""
    if not name or "\x00" in name:
        return "is empty or holds a NUL character"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "://" in name:
        return "is absolute (a root, drive or URI)"
    if ".." in re.split(r"[/\\]", name):
        return "climbs out of the directory ('..')"
    if uri and re.search(r"[%?#]", name):
        return "holds %, ? or #, which a URI location does not read as part of the name"
    return None


def _where(path: str, section: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{path}: {section}[{index}]" + (f" (id={ident})" if ident is not None else "")


def _require(entry: Any, key: str, kinds: tuple, where: str) -> Any:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise CocoFormatError(f"{where}: missing required key '{key}'")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise CocoFormatError(f"{where}: key '{key}' must be {names}, got {value!r}")
    return value


def _section(data: dict, key: str, path: str) -> list:
    if key not in data:
        raise CocoFormatError(f"{path}: missing required top-level key '{key}'")
    if not isinstance(data[key], list):
        raise CocoFormatError(f"{path}: top-level key '{key}' must be a list")
    return data[key]


def _parse_categories(entries: list, path: str) -> list[Category]:
    seen: dict[int, int] = {}
    out = []
    for i, entry in enumerate(entries):
        where = _where(path, "categories", i, entry)
        cid = _require(entry, "id", (int,), where)
        name = _require(entry, "name", (str,), where)
        sup = entry.get("supercategory", "")
        if not isinstance(sup, str):
            raise CocoFormatError(f"{where}: key 'supercategory' must be str, got {sup!r}")
        if cid in seen:
            raise CocoFormatError(f"{where}: duplicate category id {cid} (also categories[{seen[cid]}])")
        seen[cid] = i
        out.append(Category(cid, name, sup))
    if not out:
        raise CocoFormatError(f"{path}: 'categories' is empty; at least one category is needed")
    return sorted(out, key=lambda c: c.id)


def _parse_images(entries: list, path: str) -> list[ImageRecord]:
    seen: dict[int, int] = {}
    out = []
    for i, entry in enumerate(entries):
        where = _where(path, "images", i, entry)
        iid = _require(entry, "id", (int,), where)
        file_name = _require(entry, "file_name", (str,), where)
        problem = unsafe_name(file_name)
        if problem:
            raise CocoFormatError(
                f"{where}: key 'file_name' {file_name!r} {problem}; it must be a path relative to the images directory"
            )
        width = _require(entry, "width", (int,), where)
        height = _require(entry, "height", (int,), where)
        if width <= 0 or height <= 0:
            raise CocoFormatError(f"{where}: width and height must be positive, got {width}x{height}")
        if iid in seen:
            raise CocoFormatError(f"{where}: duplicate image id {iid} (also images[{seen[iid]}])")
        seen[iid] = i
        out.append(ImageRecord(iid, file_name, width, height))
    return sorted(out, key=lambda r: r.id)


def _clip_box(bbox: list, width: int, height: int) -> tuple[tuple[float, float, float, float] | None, str | None, bool]:
    """Returns (clipped xywh box or None, drop reason or None, whether it was clipped)."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None, DROP_DEGENERATE, False
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None, DROP_OUTSIDE, False
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return (x0, y0, x1 - x0, y1 - y0), None, clipped


def parse_coco(data: Any, path: str, sha256: str = "") -> CocoDataset:
    """Validates an already-parsed COCO dict (see the module docstring for the rules)."""
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    categories = _parse_categories(_section(data, "categories", path), path)
    images = _parse_images(_section(data, "images", path), path)
    raw_annotations = _section(data, "annotations", path)

    sizes = {r.id: (r.width, r.height) for r in images}
    known_categories = {c.id for c in categories}
    grouped: dict[int, list[Annotation]] = {}
    dropped: Counter = Counter()
    clipped = 0
    seen: dict[int, int] = {}
    for i, entry in enumerate(raw_annotations):
        where = _where(path, "annotations", i, entry)
        aid = _require(entry, "id", (int,), where)
        image_id = _require(entry, "image_id", (int,), where)
        category_id = _require(entry, "category_id", (int,), where)
        bbox = _require(entry, "bbox", (list,), where)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise CocoFormatError(f"{where}: key 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        iscrowd = entry.get("iscrowd", 0)
        if iscrowd not in (0, 1, True, False):
            raise CocoFormatError(f"{where}: key 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        area = entry.get("area")
        if area is not None and (isinstance(area, bool) or not isinstance(area, (int, float))):
            raise CocoFormatError(f"{where}: key 'area' must be a number, got {area!r}")
        if aid in seen:
            raise CocoFormatError(f"{where}: duplicate annotation id {aid} (also annotations[{seen[aid]}])")
        seen[aid] = i

        if image_id not in sizes:
            dropped[DROP_UNKNOWN_IMAGE] += 1
            continue
        if category_id not in known_categories:
            dropped[DROP_UNKNOWN_CATEGORY] += 1
            continue
        box, reason, was_clipped = _clip_box(bbox, *sizes[image_id])
        if box is None:
            dropped[reason] += 1
            continue
        clipped += was_clipped
        grouped.setdefault(image_id, []).append(
            Annotation(
                id=aid,
                image_id=image_id,
                category_id=category_id,
                bbox=box,
                area=float(area) if area is not None else box[2] * box[3],
                iscrowd=bool(iscrowd),
            )
        )
    if dropped or clipped:
        logger.warning("%s: dropped annotations %s, clipped %d boxes", path, dict(dropped), clipped)
    return CocoDataset(
        path=path,
        sha256=sha256,
        images=images,
        categories=categories,
        annotations=grouped,
        dropped=dropped,
        clipped=clipped,
        num_source_annotations=len(raw_annotations),
    )


def load_coco(path: str) -> CocoDataset:
    """Reads and validates a COCO instances JSON file (local path or pyarrow filesystem URI)."""
    try:
        raw = read_bytes(path)
    except OSError as e:
        raise CocoFormatError(f"{path}: cannot read the annotation file: {e}") from e
    sha256 = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path}: malformed JSON: {e}") from e
    return parse_coco(data, path, sha256)
