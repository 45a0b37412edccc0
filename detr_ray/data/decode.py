"""Shard rows -> decoded, augmented rows: what a Ray Data decode task runs (datasets.py maps
`decode_blocks` over the read blocks).

Rows after `decode_augment` (`DECODED_SCHEMA`): image_id, image (raw uint8 HWC bytes), height and
width of the augmented image, orig_height/orig_width, boxes (flattened normalized cx, cy, w, h),
labels (contiguous, int64), skipped (True for an undecodable image: counted, never trained on).
Crowd annotations (iscrowd=1) are left out of the targets, as in DETR.

Each image's augmentation is drawn from (seed, epoch, image id) when the dataset is seeded
(`decode_augment`). No copy of the pixels is made in the decode task (one Arrow chunk per image),
and glibc keeps freed buffers (`keep_freed_memory`) in decoding and batching processes instead
of faulting in fresh zeroed pages for every image and batch.

Importing this module in a process with Ray Data loaded installs ray_data_scheduling_patch: the
process that runs the executions of `get_dataset_shard` (Ray Train's SplitCoordinator, or the
worker of a one-worker run) imports it when it unpickles a dataset (decode_blocks lives here).
So do processes that only hold a dataset (Ray Train's DatasetManager), which is why torch and
the transforms are imported where an image is decoded, not here: importing torch and
torchvision costs 3-5 s of CPU per process on 2 cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import sys
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from detr_ray.data import ray_data_scheduling_patch
from detr_ray.data.images import decode_rgb
from detr_ray.data.recipe import TransformConfig

logger = logging.getLogger(__name__)

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


NO_PIXELS = np.zeros(0, dtype=np.uint8)  # the image of a skipped row


class ShardRowError(RuntimeError):
    """A shard row could not be turned into a training sample for a reason other than a corrupt
    image. The message names the shard file and the row (image_id, file_name)."""


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
    import torch

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
    import torch

    from detr_ray.data.transforms import DetectionTransform

    if not _process_ready:
        _prepare_process()
    transform = DetectionTransform(TransformConfig(**augment), train=train)
    epoch = _execution_index() if train and seed is not None else None
    rows = {name: batch.column(name).to_pylist() for name in READ_COLUMNS}
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else ["?"] * batch.num_rows
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}

    def emit(image_id, image=NO_PIXELS, size=(0, 0), orig=(0, 0), boxes=(), labels=(), skipped=False):
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
                logger.warning(
                    "%s: skipping image_id=%s (%s): cannot decode: %s",
                    paths[i],
                    image_id,
                    file_name,
                    str(e).splitlines()[0],
                )
                emit(image_id, orig=orig, skipped=True)
                continue
            if tuple(image.shape[-2:]) != orig:
                logger.warning(
                    "%s: skipping image_id=%s (%s): decoded size %s, row says %s",
                    paths[i],
                    image_id,
                    file_name,
                    tuple(image.shape[-2:]),
                    orig,
                )
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


if "ray.data" in sys.modules:  # a process that may run executions (see ray_data_scheduling_patch)
    ray_data_scheduling_patch.install()
