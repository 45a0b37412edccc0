"""Ray Data datasets for training and validation: shards -> decoded, augmented rows.

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
- read and decode fuse into one task. Ray Data fuses two maps only if their remote args agree
  (the map names no scheduling strategy: it inherits the read's SPREAD; naming one would go
  through the deprecated `ray_remote_args`) and the second asks for no minimum rows, hence
  batch_size=None, with `decode_blocks` slicing the block into decode batches itself. Separate,
  the reads and decodes had separate CPU reservations, and one decode task ran until every read
  had finished.
- decoded output blocks of OUTPUT_BLOCK_BYTES (16 MiB, not Ray's 128 MiB): a task hands its first
  rows over after one decode batch instead of after most of its block.
- ray_data_scheduling_patch: an execution's resource limits arrive at its first scheduling steps
  instead of after one second (until then Ray Data 2.60 runs one task at a time), and a finished
  task's CPU goes to the next task at once instead of at the scheduling loop's 0.1 s timeout.
- no copy of the pixels in the decode task (one Arrow chunk per image), and glibc keeps freed
  buffers (`keep_freed_memory`) in decoding and batching processes instead of faulting in fresh
  zeroed pages for every image and batch.

Rows: decode.py (DECODED_SCHEMA); batches of them: collate.py and batches.py.
"""

from __future__ import annotations

import sys
from typing import Any

from detr_ray.config import DataConfig
from detr_ray.data import ray_data_scheduling_patch
from detr_ray.data.decode import READ_COLUMNS, decode_blocks
from detr_ray.data.recipe import TransformConfig
from detr_ray.data.shards import read_meta

READ_BLOCK_BATCHES = 4  # a read block (and one decode task) holds this many decode batches
OUTPUT_BLOCK_BYTES = 16 * 2**20  # target size of a decoded output block (Ray's default: 128 MiB)


def progress_bars_wanted(stream=None) -> bool:
    """Whether a dataset built here shows Ray Data's per-operator progress bars: only when this
    process's stdout (`stream`) is a terminal. The bars redraw with carriage returns; where output
    goes to a file (a sweep's log, `ray job logs`) every redraw becomes a line. The choice travels
    with the dataset's context to the process that runs it (Ray Train's SplitCoordinator or a
    Train worker, whose own stdout is never a terminal and whose bars are drawn by the driver)."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


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
    reproducible: see `decode_augment`); train=False: shard order and the val recipe. Ray Data's
    progress bars only where stdout is a terminal (`progress_bars_wanted`)."""
    import ray.data
    from ray.data import DataContext, FileShuffleConfig

    ray_data_scheduling_patch.install()
    meta = read_meta(shards_uri)
    augment.validate()
    rows = sum(s["rows"] for s in meta.shards)
    blocks = max(len(meta.shards), -(-rows // (READ_BLOCK_BATCHES * decode_batch_size)))
    context = DataContext.get_current()
    settings = ("use_datasource_v2", "target_max_block_size", "enable_progress_bars")
    saved = {name: getattr(context, name) for name in settings}
    # Captured by the dataset at creation, so set only while creating it (see the module docstring).
    context.use_datasource_v2 = False  # V2 gives one decode task
    context.target_max_block_size = OUTPUT_BLOCK_BYTES
    context.enable_progress_bars = context.enable_progress_bars and progress_bars_wanted()
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


def build_datasets(
    cfg: DataConfig, train_uri: str, val_uri: str, augment: TransformConfig, seed: int | None = None
) -> dict[str, Any]:
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
