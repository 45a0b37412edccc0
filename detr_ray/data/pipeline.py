"""Ray Data datasets for training and validation, and the collate that pads images into a batch.

Flow (one direction):

    read_parquet(shard dir or URI)     file order shuffled every epoch (train)
      -> map_batches(decode_blocks)      fused with the read: one CPU task per read block reads,
                                         decodes and augments it, on any node (SPREAD), CPU-only
                                         nodes too
      -> TorchTrainer(datasets=...)      Ray Train splits it across workers (streaming_split)
      -> DetectionBatches(get_dataset_shard("train"), ...)
                                         local shuffle buffer + `collate` -> batches

Block order: the file order of read_parquet is reshuffled each epoch (streaming); a local shuffle
buffer at iteration time mixes rows across files. `Dataset.randomize_block_order` is not used:
in Ray 2.60 it is an all-to-all barrier that holds the whole split in the object store before
the first batch.

Seeds (TrainConfig.seed): the file order of each epoch, each image's augmentation (drawn from
seed, epoch and image id: `decode_augment`) and each worker's local shuffle (seed, epoch, rank:
train/loop.py) follow from the seed. What is not drawn is the order in which blocks of parallel
decode tasks arrive, and which worker a block goes to: that is timing. With one Train worker and
one decode task at a time (one CPU of decoding), the batches repeat exactly.

Parallelism: the shards are read with Ray Data's V1 Parquet datasource, split into blocks of
READ_BLOCK_BATCHES * decode_batch_size rows, so that decoding runs as parallel tasks on every
CPU. Ray 2.60's default (V2) reader handed all small files of a split to one read task as one
block, and so the whole epoch to a single decode task (measured: ~1 core busy of 2).

Keeping every CPU busy (measured on 2 CPUs, 640 COCO-sized JPEGs per 3 s epoch; before, the
first batch of an epoch came after 0.9-1.5 s and only ~1.5 cores were busy):
- read and decode fuse into one task. Ray Data fuses two maps only if their remote args are equal
  (the read is SPREAD) and the second asks for no minimum rows, hence batch_size=None, with
  `decode_blocks` slicing the block into decode batches itself. Separate, the reads and decodes
  had separate CPU reservations, and one decode task ran until every read had finished.
- decoded output blocks of OUTPUT_BLOCK_BYTES (16 MiB, not Ray's 128 MiB): a task hands its first
  rows over after one decode batch instead of after most of its block.
- ray_data_fixes: an execution's resource limits arrive at its first scheduling steps instead of
  after one second (until then Ray Data 2.60 runs one task at a time), and a finished task's CPU
  goes to the next task at once instead of at the scheduling loop's 0.1 s timeout.
- no copy of the pixels in the decode task (one Arrow chunk per image), and glibc keeps freed
  buffers (`keep_freed_memory`) in decoding and batching processes instead of faulting in fresh
  zeroed pages for every image and batch.

Rows after `decode_augment` (`DECODED_SCHEMA`): image_id, image (raw uint8 HWC bytes), height and
width of the augmented image, orig_height/orig_width, boxes (flattened normalized cx, cy, w, h),
labels (contiguous, int64), skipped (True for an undecodable image: counted, never trained on).
Crowd annotations (iscrowd=1) are left out of the targets, as in DETR.

A batch delivered to the trainer (`collate`):
    images  uint8 [B, 3, H, W] in channels-last memory layout (strides of [B, H, W, 3], which is
            how the JPEG decoder and the resize produce pixels, so no transposing copy is made on
            the CPU; `normalize` on the training device picks the layout the model wants),
            zero-padded on the right and bottom to the batch's largest H, W
    mask    bool  [B, H, W], True on padding
    targets list of B dicts: boxes float32 [N, 4] normalized (cx, cy, w, h) relative to the
            unpadded augmented image; labels int64 [N] in 0..K-1; image_id int;
            orig_size int64 [2] (h, w) of the original image; size int64 [2] (h, w) augmented.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import queue
import random
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from detr_ray.config import DataConfig
from detr_ray.data import ray_data_fixes
from detr_ray.data.images import decode_rgb
from detr_ray.data.shards import read_meta
from detr_ray.data.transforms import DetectionTransform, TransformConfig

logger = logging.getLogger(__name__)

READ_BLOCK_BATCHES = 4  # a read block (and one decode task) holds this many decode batches
OUTPUT_BLOCK_BYTES = 16 * 2**20  # target size of a decoded output block (Ray's default: 128 MiB)
READ_COLUMNS = ["image_id", "file_name", "width", "height", "image", "boxes", "category_ids", "iscrowd"]

DECODED_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("image", pa.large_binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("boxes", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int64())),
        ("skipped", pa.bool_()),
    ]
)


_NO_PIXELS = np.zeros(0, dtype=np.uint8)  # the image of a skipped row


class ShardRowError(RuntimeError):
    """A shard row could not be turned into a training sample for a reason other than a corrupt
    image. The message names the shard file and the row (image_id, file_name)."""


# --------------------------------------------------------------------------------------------
# Decode + augment (runs inside Ray Data tasks)

_process_ready = False
_malloc_tuned = False


def keep_freed_memory() -> None:
    """glibc malloc settings for a process that handles pixel buffers of a few MB (decoding,
    batching), once per process: allocations below 32 MiB are served from the heap, and freed
    heap memory is kept (trimmed only above 512 MiB) instead of going back to the kernel and being
    faulted back in, zeroed, for the next image or batch. Measured in one decode process
    (COCO-sized JPEGs): 200-270 page faults and 0.4 ms of kernel time per image -> none. No-op
    where libc is not glibc."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on `parts` only: the same in every process, run and Python
    (seeds for one epoch, rank or image are derived from the run's seed with it)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _execution_index() -> int:
    """How many executions of the dataset this task belongs to came before it: the epoch, for a
    Train worker's shard. Ray Data's own count (DataContext._execution_idx), the one its seeded
    file shuffle (`FileShuffleConfig`) reseeds from; like that shuffle, it starts again at 0 when
    Ray Train restarts its workers or a run resumes."""
    from ray.data import DataContext

    return getattr(DataContext.get_current(), "_execution_idx", 0)


def _prepare_process() -> None:
    """Once per decoding process: a random torch seed for unseeded datasets (Ray worker
    processes all start from torch's fixed default seed) and `keep_freed_memory`."""
    global _process_ready
    torch.seed()
    keep_freed_memory()
    _process_ready = True


def decode_augment(
    batch: pa.Table, *, train: bool, augment: dict[str, Any], category_to_label: dict[int, int], seed: int | None = None
) -> pa.Table:
    """Shard rows (READ_COLUMNS + path) -> DECODED_SCHEMA rows (called by `decode_blocks`).

    With a `seed`, an image's augmentation is drawn from (seed, epoch, image_id) alone, so it is
    the same in every run whichever task, process or node decodes it and in whatever order
    (Ray Data schedules tasks as resources free up); without one, from the process's generator.

    An image that fails to decode (or decodes to another size than its row says) becomes a
    `skipped` row and a warning; any other failure raises ShardRowError naming shard and row."""
    if not _process_ready:
        _prepare_process()
    transform = DetectionTransform(TransformConfig(**augment), train=train)
    epoch = _execution_index() if train and seed is not None else None
    rows = {name: batch.column(name).to_pylist() for name in READ_COLUMNS}
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else ["?"] * batch.num_rows
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}

    def emit(image_id, image=_NO_PIXELS, size=(0, 0), orig=(0, 0), boxes=(), labels=(), skipped=False):
        out["image_id"].append(image_id)
        out["image"].append(image)
        out["height"].append(size[0])
        out["width"].append(size[1])
        out["orig_height"].append(orig[0])
        out["orig_width"].append(orig[1])
        out["boxes"].append(list(boxes))
        out["labels"].append(list(labels))
        out["skipped"].append(skipped)

    for i in range(batch.num_rows):
        image_id, file_name = rows["image_id"][i], rows["file_name"][i]
        orig = (rows["height"][i], rows["width"][i])
        try:
            try:
                image = decode_rgb(rows["image"][i], *orig)  # oriented as at conversion
            except RuntimeError as e:
                logger.warning("%s: skipping image_id=%s (%s): cannot decode: %s",
                               paths[i], image_id, file_name, str(e).splitlines()[0])
                emit(image_id, orig=orig, skipped=True)
                continue
            if tuple(image.shape[-2:]) != orig:
                logger.warning("%s: skipping image_id=%s (%s): decoded size %s, row says %s",
                               paths[i], image_id, file_name, tuple(image.shape[-2:]), orig)
                emit(image_id, orig=orig, skipped=True)
                continue
            keep = [j for j, crowd in enumerate(rows["iscrowd"][i]) if not crowd]
            boxes = torch.tensor([rows["boxes"][i][j] for j in keep], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([category_to_label[rows["category_ids"][i][j]] for j in keep], dtype=torch.int64)
            generator = None if epoch is None else torch.Generator().manual_seed(derive_seed(seed, epoch, image_id))
            image, boxes, labels = transform(image, boxes, labels, generator)
            emit(
                image_id,
                image=image.permute(1, 2, 0).contiguous().numpy().reshape(-1),  # HWC: usually a view
                size=tuple(image.shape[-2:]),
                orig=orig,
                boxes=boxes.reshape(-1).tolist(),
                labels=labels.tolist(),
            )
        except Exception as e:
            raise ShardRowError(
                f"{paths[i]}: row image_id={image_id} file_name={file_name!r}: {type(e).__name__}: {e}"
            ) from e
    out["image"] = _large_binary(out["image"])
    return pa.Table.from_pydict(out, schema=DECODED_SCHEMA)


def decode_blocks(block: pa.Table, *, rows_per_output: int, **kwargs) -> Iterator[pa.Table]:
    """map_batches function over whole read blocks: `decode_augment` on `rows_per_output` rows at
    a time, each result yielded as its own output (a task never holds a block's decoded pixels
    at once)."""
    for start in range(0, block.num_rows, rows_per_output):
        yield decode_augment(block.slice(start, rows_per_output), **kwargs)


def _large_binary(arrays: list[np.ndarray]) -> pa.ChunkedArray:
    """uint8 arrays -> a large_binary column with one chunk per array, each wrapping the array's
    memory: no copy here (the one copy is Ray's, into the object store). Concatenating them into
    one buffer first cost a copy of every pixel and, above glibc's 32 MiB mmap threshold, fresh
    zeroed pages for every batch (0.45 ms per COCO-sized image, a tenth of a decode task)."""
    chunks = [
        pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, a.nbytes], dtype=np.int64)), pa.py_buffer(a)]
        )
        for a in arrays
    ]
    return pa.chunked_array(chunks, type=pa.large_binary())


# --------------------------------------------------------------------------------------------
# Datasets


def detection_dataset(
    shards_uri: str,
    augment: TransformConfig,
    *,
    train: bool,
    decode_batch_size: int = 16,
    decode_num_cpus: float = 1.0,
    seed: int | None = None,
):
    """A Ray Data Dataset of decoded, augmented rows (DECODED_SCHEMA) from a shard directory.

    train=True: file order reshuffled every epoch and the train recipe (`seed` makes both
    reproducible: see `decode_augment`); train=False: shard order and the val recipe."""
    import ray.data
    from ray.data import DataContext, FileShuffleConfig

    ray_data_fixes.install()
    meta = read_meta(shards_uri)
    augment.validate()
    rows = sum(s["rows"] for s in meta.shards)
    blocks = max(len(meta.shards), -(-rows // (READ_BLOCK_BATCHES * decode_batch_size)))
    context = DataContext.get_current()
    saved = {name: getattr(context, name) for name in ("use_datasource_v2", "target_max_block_size")}
    # Captured by the dataset at creation, so set only while creating it (see the module docstring).
    context.use_datasource_v2 = False  # V2 gives one decode task
    context.target_max_block_size = OUTPUT_BLOCK_BYTES
    try:
        ds = ray.data.read_parquet(
            shards_uri,
            columns=READ_COLUMNS,
            include_paths=True,
            shuffle=FileShuffleConfig(seed=seed) if train else None,
            num_cpus=decode_num_cpus,
            override_num_blocks=blocks,
        )
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
    # batch_size=None: each task decodes whole read blocks, which lets Ray Data fuse the read
    # and the decode into one task (a batch_size makes the map ask for a minimum bundle of rows
    # and keeps them apart); `decode_blocks` still works and yields decode_batch_size rows at a time.
    return ds.map_batches(
        decode_blocks,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=decode_num_cpus,
        scheduling_strategy="SPREAD",  # as the read's: equal remote args are needed to fuse
        fn_kwargs={
            "rows_per_output": decode_batch_size,
            "train": train,
            "augment": {k: getattr(augment, k) for k in augment.__dataclass_fields__},
            "category_to_label": meta.category_id_to_label,
            "seed": seed if train else None,
        },
    )


def train_dataset(shards_uri: str, augment: TransformConfig, **kwargs):
    return detection_dataset(shards_uri, augment, train=True, **kwargs)


def val_dataset(shards_uri: str, augment: TransformConfig, **kwargs):
    return detection_dataset(shards_uri, augment, train=False, **kwargs)


def resolve_shards(cfg: DataConfig) -> tuple[str, str]:
    """(train_uri, val_uri): the configured ones, or the demo's (generated if missing)."""
    cfg.validate()
    if not cfg.uses_demo:
        return cfg.train, cfg.val
    from detr_ray.data.demo import default_demo_root, ensure_demo_shards

    return ensure_demo_shards(cfg.demo_root or default_demo_root())


def build_datasets(cfg: DataConfig, train_uri: str, val_uri: str, augment: TransformConfig, seed: int | None = None) -> dict[str, Any]:
    """{"train": Dataset, "val": Dataset} for TorchTrainer(datasets=...), from the shards the
    run resolved (resolve_shards) with its recipe (recipe.augment_recipe)."""
    common = dict(
        decode_batch_size=cfg.decode_batch_size,
        decode_num_cpus=cfg.decode_num_cpus,
    )
    return {
        "train": train_dataset(train_uri, augment, seed=seed, **common),
        "val": val_dataset(val_uri, augment, **common),
    }


# --------------------------------------------------------------------------------------------
# Collate


class _Row(NamedTuple):
    """One decoded image, its pixels still a view into the Arrow block that holds them."""

    image_id: int
    pixels: np.ndarray  # uint8 [h * w * 3], HWC, read-only view
    height: int
    width: int
    orig_height: int
    orig_width: int
    boxes: list
    labels: list


def _column(batch: Any, name: str) -> list:
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist()
    return list(batch[name])


def _pixel_views(batch: Any) -> list[np.ndarray]:
    """Read-only uint8 views of each row's raw pixels, without copying them."""
    if not isinstance(batch, pa.Table):
        return [np.frombuffer(b, dtype=np.uint8) for b in batch["image"]]
    views = []
    for chunk in batch.column("image").chunks:
        chunk = chunk.cast(pa.large_binary()) if chunk.type != pa.large_binary() else chunk
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else _NO_PIXELS
        views += [data[offsets[i] : offsets[i + 1]] for i in range(len(chunk))]
    return views


def _rows(batch: Any) -> tuple[list[_Row], int]:
    """(the rows that hold an image, the number of skipped rows) of a DECODED_SCHEMA batch (an
    Arrow table or a dict of numpy arrays). Pixels are not copied."""
    skipped = _column(batch, "skipped")
    columns = zip(
        _column(batch, "image_id"), _pixel_views(batch), _column(batch, "height"), _column(batch, "width"),
        _column(batch, "orig_height"), _column(batch, "orig_width"), _column(batch, "boxes"), _column(batch, "labels"),
    )
    rows = [_Row(int(i), px, int(h), int(w), int(oh), int(ow), b, lab)
            for (i, px, h, w, oh, ow, b, lab), s in zip(columns, skipped) if not s]
    return rows, len(skipped) - len(rows)


def _collate_rows(rows: list[_Row]) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Pads rows into (images, mask, targets): the one copy of each image's pixels."""
    max_h = max((r.height for r in rows), default=0)
    max_w = max((r.width for r in rows), default=0)
    # Allocated by numpy, shared with torch: torch's CPU allocator handed out fresh pages for
    # every batch (page faults: 5 ms per 25 MB against 0.6 ms here).
    pixels = np.empty((len(rows), max_h, max_w, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels)
    mask = np.empty((len(rows), max_h, max_w), dtype=bool)
    targets = []
    for k, r in enumerate(rows):
        h, w = r.height, r.width
        # Every byte is written once: the image, then its padding (zero-filling the whole
        # buffer first cost as much as the copy itself).
        pixels[k, :h, :w] = r.pixels.reshape(h, w, 3)
        pixels[k, :h, w:] = 0
        pixels[k, h:] = 0
        mask[k, :h, :w] = False  # (a broadcast comparison cost 6x more)
        mask[k, :h, w:] = True
        mask[k, h:] = True
        targets.append(
            {
                "boxes": torch.tensor(np.asarray(r.boxes, dtype=np.float32)).reshape(-1, 4),
                "labels": torch.tensor(np.asarray(r.labels, dtype=np.int64)).reshape(-1),
                "image_id": r.image_id,
                "orig_size": torch.tensor([r.orig_height, r.orig_width], dtype=torch.int64),
                "size": torch.tensor([h, w], dtype=torch.int64),
            }
        )
    return images.permute(0, 3, 1, 2), torch.from_numpy(mask), targets


def shape_group(height: int, width: int) -> tuple[bool, int]:
    """Images batched together under `group_shapes`: same orientation, longest side in the same
    256-pixel band. On DETR's COCO recipe (every image its own random scale), batch 8, it takes
    the padding from 44% to 20% of a batch's pixels, 0.95 -> 0.67 Mpx per image for the model
    (benchmarks/batch_padding.py; orientation alone: about 35%)."""
    return height >= width, max(height, width) // 256


def collate(batch: Any) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Pads a batch of decoded rows (an Arrow table or a dict of numpy arrays, DECODED_SCHEMA)
    into (images, mask, targets); skipped rows are left out."""
    return _collate_rows(_rows(batch)[0])


def _in_background(items: Iterator, depth: int) -> Iterator:
    """Runs the iterator in a thread, `depth` items ahead of the consumer (the copies in collate
    release the GIL, so they overlap with the training step). Errors reach the consumer; leaving
    the loop early stops the thread and closes the iterator."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((done, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="detr-ray-batches", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------
# Iteration inside a Train worker


@dataclass
class DetectionBatches:
    """Iterates a Ray Data DataIterator (`ray.train.get_dataset_shard(name)`) or Dataset as
    `(images, mask, targets)` batches (see the module docstring), one pass per `iter()`.

    Blocks arrive as Arrow tables; rows wait in a local shuffle buffer of `shuffle_buffer` rows
    (0: arrival order) that holds references, not copies, and are drawn from it at random (from
    `shuffle_seed` and the pass number when given). With
    `group_shapes`, a drawn row waits until `batch_size` rows of its `shape_group` are drawn,
    so that a batch is not padded to a portrait's height and a landscape's width (the
    remainders are batched together at the end of the pass). A batch is padded straight from
    the blocks' memory: one copy of the pixels per image (Ray's own `local_shuffle_buffer_size`
    copied them twice more, `take` then `combine_chunks`). Drawing and padding run in a
    background thread, `prefetch_batches` batches ahead.

    After (or during) a pass, `skipped` is the number of corrupt images skipped in that pass and
    `images` the number delivered. Both count this worker's part only: sum them over the workers
    for the epoch's totals. Batches are full except the last of a pass (dropped with
    `drop_last`). Tensors are moved to `device` (non_blocking; targets' tensors too).

        batches = DetectionBatches.from_config(ray.train.get_dataset_shard("train"), cfg, train=True)
        for epoch in range(epochs):
            for images, mask, targets in batches:
                ...
            metrics["skipped_images"] = batches.skipped"""

    source: Any
    batch_size: int
    shuffle_buffer: int = 0
    shuffle_seed: int | None = None
    group_shapes: bool = False
    drop_last: bool = False
    prefetch_batches: int = 2
    device: str | torch.device = "cpu"
    skipped: int = field(default=0, init=False)
    images: int = field(default=0, init=False)
    _passes: int = field(default=0, init=False, repr=False)

    @classmethod
    def from_config(
        cls, source: Any, cfg: DataConfig, train: bool, device: str | torch.device = "cpu", shuffle_seed: int | None = None
    ):
        return cls(
            source,
            batch_size=cfg.batch_size,
            shuffle_buffer=cfg.shuffle_buffer if train else 0,
            shuffle_seed=shuffle_seed,
            group_shapes=cfg.group_shapes,
            prefetch_batches=cfg.prefetch_batches,
            device=device,
        )

    def _batches(self, rng: random.Random | None) -> Iterator[tuple[Tensor, Tensor, list[dict[str, Any]]]]:
        """Collated CPU batches of one pass; counts skipped and delivered images."""
        fill = max(self.shuffle_buffer, self.batch_size)
        buffer: list[_Row] = []  # arrival order; drawn from at random when shuffling
        groups: dict[Any, list[_Row]] = {}  # drawn rows waiting for a batch of their shape group

        def draw() -> _Row:
            if rng is None:
                return buffer.pop(0)
            j = rng.randrange(len(buffer))  # swap the drawn row with the last one, then pop it
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        def place(row: _Row) -> list[_Row] | None:
            key = shape_group(row.height, row.width) if self.group_shapes else None
            group = groups.setdefault(key, [])
            group.append(row)
            return groups.pop(key) if len(group) == self.batch_size else None

        blocks = self.source.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch_batches
        )
        for block in blocks:
            rows, skipped = _rows(block)
            self.skipped += skipped
            buffer += rows
            while len(buffer) >= fill:
                batch = place(draw())
                if batch:
                    yield self._deliver(batch)
        while buffer:
            batch = place(draw())
            if batch:
                yield self._deliver(batch)
        rest = [row for group in groups.values() for row in group]  # the groups' remainders, mixed
        for k in range(0, len(rest), self.batch_size):
            if len(rest) - k >= self.batch_size or not self.drop_last:
                yield self._deliver(rest[k : k + self.batch_size])

    def _deliver(self, rows: list[_Row]):
        self.images += len(rows)
        return _collate_rows(rows)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[dict[str, Any]]]]:
        keep_freed_memory()  # a fresh batch buffer per batch: see there
        self.skipped = 0
        self.images = 0
        self._passes += 1
        rng = None
        if self.shuffle_buffer:
            rng = random.Random(None if self.shuffle_seed is None else f"{self.shuffle_seed}:{self._passes}")
        device = torch.device(self.device)
        for images, mask, targets in _in_background(self._batches(rng), self.prefetch_batches):
            if device.type != "cpu":
                images = images.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                targets = [
                    {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
                    for t in targets
                ]
            yield images, mask, targets


if "ray.data" in sys.modules:  # a process that may run executions (see ray_data_fixes)
    ray_data_fixes.install()
