"""Parquet shards of one COCO split: the schema, the parallel writer, and the readers.

A shard directory (local folder or pyarrow URI such as s3://bucket/coco/train) holds

    part-00000-of-00118-<plan>.parquet   ~shard_size images each, one row per image
    ...
    _meta.json                           written last: the directory is complete once it exists

Row schema (`SHARD_SCHEMA`, version `SCHEMA_VERSION`):

    image_id int64, file_name string, width int32, height int32 (as in the annotation file)
    image binary                 the encoded file bytes (JPEG/PNG) as read; decoded with the
                                 EXIF rule of `detr_ray.data.images`
    annotation_ids list<int64>   one entry per object, all lists in the same order
    boxes list<list<float32>[4]> [x, y, w, h] in pixels, clipped to the image
    category_ids list<int64>     the source's category ids
    iscrowd list<bool>, area list<float32>

`_meta.json` (see `DatasetMeta`): schema version, categories (original id, name,
supercategory), the contiguous mapping label i -> label_to_category_id[i], counts, the source
annotation file and its sha256, the shard list, and the validation summary.

Writing is idempotent: shard names carry a hash of the plan (source sha256, shard size, schema
version), finished shards made with the same options (`max_pixels`) are detected and reused on a
rerun, and a shard is written only when every one of its image files could be read. The writer
replaces only its own files: an output directory holding anything else (shards of another plan, a
`_meta.json` that is not detr-ray's, any other file) is an error naming it, and nothing is written.

Names read from files never reach outside their directory: an image `file_name` must be a
relative path inside the images directory (coco.unsafe_name), and a shard `file` listed in
`_meta.json` a plain file name in the shard directory; anything else is an error naming the entry.

The module is long because it is the on-disk format in one place: the schema, the writer and the
readers change together (with SCHEMA_VERSION), and a reader checks what the writer promises.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from detr_ray.data import storage
from detr_ray.data.coco import Annotation, Category, CocoDataset, ImageRecord, unsafe_name
from detr_ray.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_rgb, stored_size

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_FILE = "_meta.json"
ROW_GROUP_SIZE = 64  # rows per Parquet row group: the unit a reader can stream

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("annotation_ids", pa.list_(pa.int64())),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("category_ids", pa.list_(pa.int64())),
        ("iscrowd", pa.list_(pa.bool_())),
        ("area", pa.list_(pa.float32())),
    ]
)
_REPORT_KEY = b"detr_ray.shard_report"

# Reasons an image file is skipped.
SKIP_MISSING = "missing file"
SKIP_UNDECODABLE = "undecodable image"
SKIP_TOO_LARGE = "too many pixels"
SKIP_SIZE = "decoded size differs from the annotation's width/height"
# Older versions skipped an image on any read error under this reason; their shards are redone.
SKIP_UNREADABLE = "unreadable file"


class ShardError(RuntimeError):
    """A shard directory is missing, incomplete, inconsistent or holds foreign files."""


class ImageReadError(OSError):
    """An image file could not be read, even after retrying (not a statement about its content)."""


@dataclass(frozen=True)
class ReadRetry:
    """How reading an image file retries an I/O error (any OSError but a missing file: S3
    throttling, an NFS hiccup): up to `attempts` reads, waiting `first_delay` seconds after the
    first failure and twice as long after each further one (at most `max_delay`, with jitter so
    that parallel writers do not retry in step). The defaults wait up to ~7.5 s per file."""

    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 8.0

    def __post_init__(self):
        if self.attempts < 1 or self.first_delay < 0 or self.max_delay < 0:
            raise ValueError(f"ReadRetry: need attempts >= 1 and delays >= 0, got {self}")


# --------------------------------------------------------------------------------------------
# Metadata


@dataclass
class DatasetMeta:
    """The content of `_meta.json`."""

    schema_version: int
    categories: list[Category]
    label_to_category_id: list[int]
    counts: dict[str, Any]
    source: dict[str, str]  # {"annotations": path, "sha256": hex digest}
    shard_size: int
    shards: list[dict[str, Any]]  # [{"file": name, "rows": n}]
    validation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the demo generator's parameters

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category_id)

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.label_to_category_id)}

    @property
    def label_names(self) -> list[str]:
        names = {c.id: c.name for c in self.categories}
        return [names[cid] for cid in self.label_to_category_id]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "DatasetMeta":
        try:
            data = json.loads(text)
            data["categories"] = [Category(**c) for c in data["categories"]]
            meta = cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"{where}: unreadable {META_FILE}: {e}") from e
        if meta.schema_version != SCHEMA_VERSION:
            raise ShardError(
                f"{where}: shard schema version {meta.schema_version}, this code reads "
                f"{SCHEMA_VERSION}; re-run scripts/prepare_coco.py"
            )
        if not isinstance(meta.shards, list):
            raise ShardError(f"{where}: 'shards' must be a list, got {meta.shards!r}")
        for i, shard in enumerate(meta.shards):
            file = shard.get("file") if isinstance(shard, dict) else None
            rows = shard.get("rows") if isinstance(shard, dict) else None
            if not isinstance(file, str) or isinstance(rows, bool) or not isinstance(rows, int):
                raise ShardError(f'{where}: shards[{i}] must be {{"file": name, "rows": count}}, got {shard!r}')
            if unsafe_name(file, uri=True) or "/" in file or "\\" in file or file == ".":
                raise ShardError(
                    f"{where}: shards[{i}]: file {file!r} is not a file name inside the shard directory; "
                    "refusing to read it"
                )
        return meta


def read_meta(shards_uri: str) -> DatasetMeta:
    """Reads `_meta.json` of a finished shard directory (local path or URI)."""
    location = storage.join(shards_uri, META_FILE)
    try:
        text = storage.read_bytes(location).decode()
    except FileNotFoundError as e:
        raise ShardError(
            f"{shards_uri}: no {META_FILE}; not a finished shard directory (run scripts/prepare_coco.py to write one)"
        ) from e
    return DatasetMeta.from_json(text, location)


def shard_files(shards_uri: str) -> list[str]:
    """Locations of the Parquet files of a finished shard directory, in shard order."""
    return [storage.join(shards_uri, s["file"]) for s in read_meta(shards_uri).shards]


# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class WriteReport:
    """What `write_shards` did; `summary()` is the human-readable version."""

    out: str
    images_written: int = 0
    annotations_written: int = 0
    empty_images: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    clipped_boxes: int = 0
    dropped_annotations: dict[str, int] = field(default_factory=dict)
    skipped_images: list[dict[str, Any]] = field(default_factory=list)  # image_id, file_name, reason

    def summary(self) -> str:
        lines = [
            f"output: {self.out}",
            f"written: {self.images_written} images ({self.empty_images} without objects), "
            f"{self.annotations_written} annotations, in {self.shards_written + self.shards_reused} "
            f"shards ({self.shards_reused} already complete, reused)",
            f"clipped to the image: {self.clipped_boxes} boxes",
        ]
        if self.dropped_annotations:
            lines.append("dropped annotations:")
            lines += [f"  {n:8d}  {reason}" for reason, n in sorted(self.dropped_annotations.items())]
        else:
            lines.append("dropped annotations: none")
        if self.skipped_images:
            reasons = Counter(s["reason"] for s in self.skipped_images)
            lines.append("skipped images:")
            lines += [f"  {n:8d}  {reason}" for reason, n in sorted(reasons.items())]
            for s in self.skipped_images[:20]:
                lines.append(f"    image_id={s['image_id']} {s['file_name']}: {s['reason']}")
            if len(self.skipped_images) > 20:
                lines.append(f"    ... and {len(self.skipped_images) - 20} more")
        else:
            lines.append("skipped images: none")
        return "\n".join(lines)


@dataclass
class _ShardTask:
    index: int
    file: str
    out_uri: str
    images_dir: str
    items: list[tuple[ImageRecord, list[Annotation]]]
    options: dict[str, Any]  # conversion options that decide which images are kept
    retry: ReadRetry


def _read_with_retries(location: str, retry: ReadRetry) -> bytes:
    """The file's bytes. FileNotFoundError when it does not exist, ImageReadError when an I/O
    error persists over `retry.attempts` reads."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return storage.read_bytes(location)
        except FileNotFoundError:
            raise
        except OSError as e:
            if attempt == retry.attempts:
                raise ImageReadError(f"{location}: {type(e).__name__}: {e} (failed {attempt} reads)") from e
            delay = min(retry.max_delay, retry.first_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logger.warning(
                "%s: %s: %s; read attempt %d of %d failed, retrying in %.2f s",
                location,
                type(e).__name__,
                e,
                attempt,
                retry.attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _load_image(task: _ShardTask, record: ImageRecord) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a good image file, (None, reason) for one to skip. ImageReadError when
    the file cannot be read: that is no verdict on the image, so the shard must not be written."""
    location = storage.join(task.images_dir, record.file_name)
    try:
        data = _read_with_retries(location, task.retry)
    except FileNotFoundError:
        return None, SKIP_MISSING
    try:
        stored_size(data, task.options["max_pixels"])
    except ImageTooLarge as e:
        return None, f"{SKIP_TOO_LARGE} ({e})"
    except ValueError as e:
        return None, f"{SKIP_UNDECODABLE} ({str(e)[:120]})"
    try:
        height, width = decode_rgb(data, record.height, record.width).shape[-2:]
    except RuntimeError as e:
        return None, f"{SKIP_UNDECODABLE} ({str(e).splitlines()[0][-120:]})"
    if (height, width) != (record.height, record.width):
        return None, f"{SKIP_SIZE} (file {width}x{height}, annotation {record.width}x{record.height})"
    return data, None


def _write_shard(task: _ShardTask) -> dict[str, Any]:
    """Builds and writes one shard; returns its report (also stored in the file's metadata)."""
    columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    skipped, lost_annotations = [], 0
    for record, annotations in task.items:  # noqa: F402 (the __future__ import is not a name in use)
        try:
            data, reason = _load_image(task, record)
        except ImageReadError as e:
            raise ImageReadError(f"shard {task.file}: image_id={record.id} {record.file_name!r}: {e}") from None
        if data is None:
            skipped.append({"image_id": record.id, "file_name": record.file_name, "reason": reason})
            lost_annotations += len(annotations)
            continue
        columns["image_id"].append(record.id)
        columns["file_name"].append(record.file_name)
        columns["width"].append(record.width)
        columns["height"].append(record.height)
        columns["image"].append(data)
        columns["annotation_ids"].append([a.id for a in annotations])
        columns["boxes"].append([list(a.bbox) for a in annotations])
        columns["category_ids"].append([a.category_id for a in annotations])
        columns["iscrowd"].append([a.iscrowd for a in annotations])
        columns["area"].append([a.area for a in annotations])
    report = {
        "file": task.file,
        "rows": len(columns["image_id"]),
        "annotations": sum(len(b) for b in columns["boxes"]),
        "empty_images": sum(1 for b in columns["boxes"] if not b),
        "skipped_images": skipped,
        "annotations_of_skipped_images": lost_annotations,
        "options": task.options,
    }
    schema = SHARD_SCHEMA.with_metadata({_REPORT_KEY: json.dumps(report).encode()})
    table = pa.Table.from_pydict(columns, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_SIZE, compression="none")
    storage.write_bytes_atomic(storage.join(task.out_uri, task.file), buffer.getvalue())
    return report


def _existing_report(location: str, file: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The report stored in a finished shard, or None when the shard must be (re)written: the
    file is absent or unreadable, was made with other options, or (written by an older version)
    skipped an image over a read error, which says nothing about the image."""
    fs, path = storage.resolve(location)
    try:
        metadata = pq.read_schema(path, filesystem=fs).metadata or {}
        report = json.loads(metadata[_REPORT_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None
    if report.get("file") != file:
        return None
    if report.get("options") != options or any(
        s["reason"].startswith(SKIP_UNREADABLE) for s in report.get("skipped_images", [])
    ):
        logger.info("%s: made with other options or with read errors, redoing it", location)
        return None
    return report


def _plan(dataset: CocoDataset, shard_size: int) -> tuple[str, list[list[ImageRecord]]]:
    plan_id = hashlib.sha256(f"{dataset.sha256}:{shard_size}:{SCHEMA_VERSION}".encode()).hexdigest()[:10]
    chunks = [dataset.images[i : i + shard_size] for i in range(0, len(dataset.images), shard_size)]
    return plan_id, chunks or [[]]


def _check_missing_files(dataset: CocoDataset, images_dir: str) -> list[dict[str, Any]]:
    fs, root = storage.resolve(images_dir)
    paths = [f"{root}/{r.file_name}" for r in dataset.images]
    infos = fs.get_file_info(paths)
    return [
        {"image_id": r.id, "file_name": r.file_name, "reason": SKIP_MISSING}
        for r, info in zip(dataset.images, infos)
        if info.type != pafs.FileType.File
    ]


# storage.write_bytes_atomic's temporary file of an interrupted write of a shard or the meta
_LEFTOVER = re.compile(r"(part-\d{5}-of-\d{5}-[0-9a-f]{10}\.parquet|_meta\.json)\.[0-9a-f]{8}\.tmp")


def _is_detr_ray_meta(location: str) -> bool:
    try:
        data = json.loads(storage.read_bytes(location))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"schema_version", "shards", "source"} <= data.keys()


def _check_output(out_uri: str, files: list[str]) -> None:
    """Refuses an output directory that holds anything but this conversion's shards, a
    `_meta.json` of detr-ray and leftovers of its interrupted writes (ShardError naming them):
    the writer may replace only its own files, and a reader of the directory would mix in others."""
    present = storage.list_files(out_uri)
    shards = sorted(f for f in present if f.endswith(".parquet") and f not in files)
    if shards:
        raise ShardError(
            f"{out_uri}: holds Parquet files that are not part of this conversion "
            f"({', '.join(shards[:5])}{' ...' if len(shards) > 5 else ''}): shards of another "
            "annotation file or shard size, or not detr-ray's; choose another output or move them away"
        )
    others = [
        f for f in present if not (f in files or f.endswith(".parquet") or f == META_FILE or _LEFTOVER.fullmatch(f))
    ]
    if META_FILE in present and not _is_detr_ray_meta(storage.join(out_uri, META_FILE)):
        others.append(f"{META_FILE} (not detr-ray's)")
    others += [f"{d}/" for d in storage.list_dirs(out_uri)]
    if others:
        raise ShardError(
            f"{out_uri}: holds files that the shard writer did not write ({', '.join(sorted(others)[:5])}"
            f"{' ...' if len(others) > 5 else ''}); it replaces only its own files. Choose a new or "
            "empty output, or move them away"
        )


def write_shards(
    dataset: CocoDataset,
    images_dir: str,
    out_uri: str,
    *,
    shard_size: int = 1000,
    strict: bool = False,
    workers: int | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    read_retry: ReadRetry = ReadRetry(),
) -> WriteReport:
    """Writes `dataset` (validated by coco.load_coco) as Parquet shards plus `_meta.json`.

    Image files are read from `images_dir` (local path or URI) and checked by decoding them
    (`detr_ray.data.images`: the EXIF and colour rules); missing ones, undecodable ones, those
    whose header declares more than `max_pixels` pixels and those whose size differs from the
    annotation's are listed in the report and skipped, or, with `strict`, make this raise `ShardError`
    (missing files before anything is written; the others after the shards, without writing
    `_meta.json`). A read error is retried (`read_retry`); one that persists leaves that shard
    unwritten and raises `ShardError` naming shard and file once the other shards are written,
    without `_meta.json`. `workers` processes (default: one per core; 0 or 1: in this process)
    write shards in parallel. A rerun reuses finished shards made with the same options.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    options = {"max_pixels": max_pixels}
    plan_id, chunks = _plan(dataset, shard_size)
    n = len(chunks)
    files = [f"part-{i:05d}-of-{n:05d}-{plan_id}.parquet" for i in range(n)]
    _check_inputs(dataset, images_dir, out_uri, files, strict)

    reports: dict[int, dict[str, Any]] = {}
    tasks = []
    for i, (file, chunk) in enumerate(zip(files, chunks)):
        existing = _existing_report(storage.join(out_uri, file), file, options)
        if existing is not None:
            reports[i] = existing
        else:
            items = [(r, dataset.annotations.get(r.id, [])) for r in chunk]
            tasks.append(_ShardTask(i, file, out_uri, images_dir, items, options, read_retry))
    reused = len(reports)
    if reused:
        logger.info("%s: %d of %d shards already complete, reused", out_uri, reused, n)

    failed = _run_tasks(tasks, reports, workers, progress, out_uri)
    if failed:
        raise ShardError(
            f"{out_uri}: {len(failed)} of {n} shards not written: an image file could not be read "
            f"after {read_retry.attempts} attempts; {META_FILE} not written, a rerun redoes only "
            "the unwritten shards:\n  " + "\n  ".join(sorted(failed))
        )

    ordered = [reports[i] for i in range(n)]
    report = _write_report(dataset, ordered, out_uri, written=len(tasks), reused=reused)
    if strict and report.skipped_images:
        listed = "; ".join(f"{s['file_name']}: {s['reason']}" for s in report.skipped_images[:10])
        raise ShardError(
            f"{images_dir}: {len(report.skipped_images)} images could not be used (--strict), "
            f"{META_FILE} not written: {listed}"
        )
    meta = _meta(dataset, report, ordered, shard_size, extra_meta)
    storage.write_bytes_atomic(storage.join(out_uri, META_FILE), meta.to_json().encode())
    logger.info("%s: %d images in %d shards", out_uri, report.images_written, n)
    return report


def _check_inputs(dataset: CocoDataset, images_dir: str, out_uri: str, files: list[str], strict: bool) -> None:
    """Before anything is written: every file_name stays inside images_dir, the output directory
    holds nothing but this plan's files, and (strict) no image file is missing."""
    for record in dataset.images:  # coco.load_coco checks these too, not knowing images_dir
        problem = unsafe_name(record.file_name, uri=storage.is_uri(images_dir))
        if problem:
            raise ShardError(f"{dataset.path}: image id={record.id}: file_name {record.file_name!r} {problem}")
    _check_output(out_uri, files)
    if strict:
        missing = _check_missing_files(dataset, images_dir)
        if missing:
            listed = ", ".join(m["file_name"] for m in missing[:10])
            raise ShardError(f"{images_dir}: {len(missing)} image files are missing (--strict): {listed}")


def _run_tasks(
    tasks: list[_ShardTask], reports: dict[int, dict[str, Any]], workers: int | None, progress: bool, out_uri: str
) -> list[str]:
    """Writes the shards of `tasks` (in `workers` processes), their reports into `reports`.
    Returns the errors of the shards a persistent read error left unwritten."""
    if workers is None:
        workers = os.cpu_count() or 1
    total = sum(len(t.items) for t in tasks)
    failed: list[str] = []
    with tqdm(total=total, unit="img", desc=f"shards -> {out_uri}", disable=not progress) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                try:
                    reports[task.index] = _write_shard(task)
                except ImageReadError as e:
                    failed.append(str(e))
                bar.update(len(task.items))
        else:
            context = multiprocessing.get_context("spawn")  # no fork after torch/ray threads
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
                futures = {pool.submit(_write_shard, t): t for t in tasks}
                for future in as_completed(futures):
                    task = futures[future]
                    try:
                        reports[task.index] = future.result()
                    except ImageReadError as e:
                        failed.append(str(e))
                    bar.update(len(task.items))
    return failed


def _write_report(
    dataset: CocoDataset, ordered: list[dict[str, Any]], out_uri: str, *, written: int, reused: int
) -> WriteReport:
    """The totals of every shard's report (`ordered`: by shard index)."""
    report = WriteReport(out=out_uri, shards_written=written, shards_reused=reused)
    report.clipped_boxes = dataset.clipped
    dropped = Counter(dataset.dropped)
    for r in ordered:
        report.images_written += r["rows"]
        report.annotations_written += r["annotations"]
        report.empty_images += r["empty_images"]
        report.skipped_images += r["skipped_images"]
        if r["annotations_of_skipped_images"]:
            dropped["of a skipped image"] += r["annotations_of_skipped_images"]
    report.dropped_annotations = dict(dropped)
    return report


def _meta(
    dataset: CocoDataset,
    report: WriteReport,
    ordered: list[dict[str, Any]],
    shard_size: int,
    extra_meta: dict[str, Any] | None,
) -> DatasetMeta:
    """`_meta.json` of the written shards: per-category counts leave out the skipped images."""
    per_category = Counter()
    for annotations in dataset.annotations.values():  # noqa: F402
        per_category.update(a.category_id for a in annotations)
    skipped_ids = {s["image_id"] for s in report.skipped_images}
    for image_id in skipped_ids:
        for a in dataset.annotations.get(image_id, []):
            per_category[a.category_id] -= 1
    return DatasetMeta(
        schema_version=SCHEMA_VERSION,
        categories=list(dataset.categories),
        label_to_category_id=dataset.label_to_category_id,
        counts={
            "images": report.images_written,
            "annotations": report.annotations_written,
            "empty_images": report.empty_images,
            "per_category": {str(c.id): per_category[c.id] for c in dataset.categories},
        },
        source={"annotations": str(dataset.path), "sha256": dataset.sha256},
        shard_size=shard_size,
        shards=[{"file": r["file"], "rows": r["rows"]} for r in ordered],
        validation={
            "source_images": len(dataset.images),
            "source_annotations": dataset.num_source_annotations,
            "clipped_boxes": report.clipped_boxes,
            "dropped_annotations": report.dropped_annotations,
            "skipped_images": report.skipped_images,
        },
        extra=dict(extra_meta or {}),
    )


# --------------------------------------------------------------------------------------------
# Reading


def read_shard_table(shards_uri: str, columns: Iterable[str] | None = None) -> pa.Table:
    """All rows of a finished shard directory as one Arrow table (for small splits such as
    val; training streams the shards through Ray Data instead)."""
    tables = []
    for location in shard_files(shards_uri):
        fs, path = storage.resolve(location)
        tables.append(pq.read_table(path, columns=list(columns) if columns else None, filesystem=fs))
    return pa.concat_tables(tables)


def read_rows(
    shards_uri: str, image_ids: Iterable[int], columns: Iterable[str] = ("image_id", "image")
) -> dict[int, dict[str, Any]]:
    """image_id -> row (the given columns) for a few images, e.g. to draw them; only row groups
    that may hold them are read. Ids not in the split are absent from the result."""
    wanted = sorted({int(i) for i in image_ids})
    columns = list(dict.fromkeys(["image_id", *columns]))
    rows: dict[int, dict[str, Any]] = {}
    if not wanted:
        return rows
    for location in shard_files(shards_uri):
        fs, path = storage.resolve(location)
        table = pq.read_table(path, columns=columns, filesystem=fs, filters=[("image_id", "in", wanted)])
        for row in table.to_pylist():
            rows[row["image_id"]] = row
    return rows


def coco_ground_truth(shards_uri: str) -> dict[str, Any]:
    """Rebuilds a pycocotools-ready COCO dict (images with width/height, annotations with
    id/image_id/category_id/bbox/area/iscrowd, categories) from a shard directory and its meta.
    Use it as `COCO()`'s dataset for evaluating the split."""
    meta = read_meta(shards_uri)
    columns = ["image_id", "file_name", "width", "height", "annotation_ids", "boxes", "category_ids", "iscrowd", "area"]
    rows = read_shard_table(shards_uri, columns).to_pylist()
    images, annotations = [], []
    for row in sorted(rows, key=lambda r: r["image_id"]):
        images.append(
            {"id": row["image_id"], "file_name": row["file_name"], "width": row["width"], "height": row["height"]}
        )
        for aid, box, cid, crowd, area in zip(
            row["annotation_ids"], row["boxes"], row["category_ids"], row["iscrowd"], row["area"]
        ):
            annotations.append(
                {
                    "id": aid,
                    "image_id": row["image_id"],
                    "category_id": cid,
                    "bbox": [float(v) for v in box],
                    "area": float(area),
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in meta.categories]
    return {"images": images, "annotations": annotations, "categories": categories}
