"""Batches for a Train worker: `DetectionBatches` iterates a Ray Data shard as padded
(images, mask, targets) batches (collate.py), with a local shuffle buffer, shape groups and a
background thread that prepares batches ahead of the training step."""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from detr_ray.config import DataConfig
from detr_ray.data.collate import Row, collate_rows, image_rows, shape_group
from detr_ray.data.decode import keep_freed_memory


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


@dataclass
class DetectionBatches:
    """Iterates a Ray Data DataIterator (`ray.train.get_dataset_shard(name)`) or Dataset as
    `(images, mask, targets)` batches (see collate.py), one pass per `iter()`.

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
    `delivered` the number of images delivered. Both count this worker's part only: sum them over
    the workers for the epoch's totals. Batches are full except the last of a pass (dropped with
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
    delivered: int = field(default=0, init=False)
    _passes: int = field(default=0, init=False, repr=False)

    @classmethod
    def from_config(
        cls,
        source: Any,
        cfg: DataConfig,
        train: bool,
        device: str | torch.device = "cpu",
        shuffle_seed: int | None = None,
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
        buffer: list[Row] = []  # arrival order; drawn from at random when shuffling
        groups: dict[Any, list[Row]] = {}  # drawn rows waiting for a batch of their shape group

        def draw() -> Row:
            if rng is None:
                return buffer.pop(0)
            j = rng.randrange(len(buffer))  # swap the drawn row with the last one, then pop it
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        def place(row: Row) -> list[Row] | None:
            key = shape_group(row.height, row.width) if self.group_shapes else None
            group = groups.setdefault(key, [])
            group.append(row)
            return groups.pop(key) if len(group) == self.batch_size else None

        blocks = self.source.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch_batches
        )
        for block in blocks:
            rows, skipped = image_rows(block)
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

    def _deliver(self, rows: list[Row]):
        self.delivered += len(rows)
        return collate_rows(rows)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[dict[str, Any]]]]:
        keep_freed_memory()  # a fresh batch buffer per batch: see there
        self.skipped = 0
        self.delivered = 0
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
