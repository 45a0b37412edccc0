"""Batch inference of a checkpoint over a shard directory with Ray Data -> COCO result dicts.

    shards (val/)  -> val_dataset: read_parquet -> map_batches(decode + the val transform)   CPU tasks
                   -> map_batches(Predictor, actor pool)   one model per actor: GPU actors (one GPU
                                                           each) when the cluster has GPUs, else CPU
                   -> driver: one row per image, a tqdm progress bar, results sorted by image id

Each actor pads its batch (the training collate) and runs the checkpoint's model through
model/predict.py's predict_batch, the path validation during training takes too (DETR: every
query becomes a detection, as DETR does; a torchvision detector: its own detections), with the
dataset's own category ids. The weights travel
once through the object store (`ray.put`), so actors on other nodes need no access to the
checkpoint's files. Undecodable images are counted and get no detections.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from detr_ray import checkpoint as ckpt
from detr_ray.config import DETRConfig, ExperimentConfig, experiment_from_dict, from_dict, to_dict
from detr_ray.data.recipe import TransformConfig, augment_recipe
from detr_ray.data.shards import read_meta

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("skipped", pa.bool_()),
        ("category_ids", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float64())),
        ("boxes", pa.list_(pa.float64())),  # flattened [x, y, w, h] per detection, pixels
    ]
)


class InferenceError(RuntimeError):
    """The checkpoint cannot be run on this data (e.g. its categories are not the data's)."""


@dataclass
class InferenceConfig:
    """How inference runs. `actors`: 0 = one per GPU when the cluster has GPUs, else one (each
    CPU actor holds `cpus_per_actor` CPUs and uses as many threads). `use_gpu`: None = when the
    cluster has GPUs."""

    batch_size: int = 8
    actors: int = 0
    cpus_per_actor: float = 1.0
    use_gpu: bool | None = None
    decode_batch_size: int = 16
    decode_num_cpus: float = 1.0
    progress: bool = True

    def validate(self) -> "InferenceConfig":
        if self.batch_size < 1 or self.decode_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size}, {self.decode_batch_size}")
        if self.actors < 0 or self.cpus_per_actor <= 0 or self.decode_num_cpus <= 0:
            raise ValueError("actors must be >= 0 and CPU reservations > 0")
        return self


@dataclass
class Detector:
    """A checkpoint's model, ready to build: what inference needs from it."""

    checkpoint: Path
    experiment: ExperimentConfig
    model: DETRConfig  # num_classes set to the checkpoint's own
    weights: dict
    label_to_category_id: list[int]
    names: list[str]
    epoch: int
    metrics: dict = field(default_factory=dict)

    @functools.cached_property
    def transform(self) -> TransformConfig:
        """The val transform the run trained with (for augment "auto": as its train shards' meta
        says, read once)."""
        return augment_recipe(self.experiment.data)


def load_detector(directory: str | Path, manifest: dict | None = None) -> Detector:
    """Verifies (against `manifest` too, when given: see checkpoint.verify) and reads a
    checkpoint directory (see detr_ray/checkpoint.py)."""
    loaded = ckpt.load(directory, manifest)
    where = str(Path(directory) / ckpt.STATE)
    try:
        exp = experiment_from_dict(loaded.state.config, where + ": config")
        mapping = [int(c) for c in loaded.state.categories["label_to_category_id"]]
        names = [str(n) for n in loaded.state.categories.get("names", [str(c) for c in mapping])]
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{where}: no usable config / categories.label_to_category_id: {e}") from e
    model = replace(exp.model, num_classes=len(mapping))  # the run trained with the data's classes
    return Detector(
        Path(directory), exp, model, loaded.model, mapping, names, loaded.state.epoch, dict(loaded.state.metrics)
    )


def check_categories(detector: Detector, shards_uri: str) -> None:
    """The checkpoint must predict the data's own category ids. Categories of the data the
    checkpoint does not know are allowed (they score AP 0), with a warning."""
    meta = read_meta(shards_uri)
    data_ids = {c.id for c in meta.categories}
    unknown = [c for c in detector.label_to_category_id if c not in data_ids]
    if unknown:
        raise InferenceError(
            f"{detector.checkpoint}: predicts category ids {unknown} that {shards_uri} does not have "
            f"(its categories: {sorted(data_ids)[:20]}); this checkpoint was trained on other data"
        )
    absent = sorted(data_ids - set(detector.label_to_category_id))
    if absent:
        log.warning(
            "%s: the checkpoint never predicts categories %s of %s; they will score AP 0",
            detector.checkpoint,
            absent,
            shards_uri,
        )


# --------------------------------------------------------------------------------------------
# The actor


class Predictor:
    """Ray Data actor: decoded rows (decode.DECODED_SCHEMA) -> PREDICTION_SCHEMA rows."""

    def __init__(self, model_config: dict, weights: Any, label_to_category_id: list[int], use_gpu: bool, threads: int):
        import ray

        from detr_ray.model.detectors import build

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        model = build(from_dict(DETRConfig, model_config, "model"))
        model.load_state_dict(weights)
        self.model = model.to(self.device).eval()
        self.label_to_category_id = label_to_category_id

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        from detr_ray.data.collate import collate
        from detr_ray.model.predict import predict_batch

        out: dict[str, list] = {name: [] for name in PREDICTION_SCHEMA.names}
        per_image: dict[int, list[dict]] = {}
        images, mask, targets = collate(batch)
        if targets:
            for r in predict_batch(self.model, images, mask, targets, self.label_to_category_id).results:
                per_image.setdefault(r["image_id"], []).append(r)
        for image_id, skipped in zip(batch.column("image_id").to_pylist(), batch.column("skipped").to_pylist()):
            found = per_image.get(image_id, [])
            out["image_id"].append(image_id)
            out["skipped"].append(bool(skipped))
            out["category_ids"].append([r["category_id"] for r in found])
            out["scores"].append([r["score"] for r in found])
            out["boxes"].append([v for r in found for v in r["bbox"]])
        return pa.Table.from_pydict(out, schema=PREDICTION_SCHEMA)


# --------------------------------------------------------------------------------------------
# Driver


@dataclass
class Inference:
    results: list[dict]  # COCO result dicts, sorted by image id (query order within an image)
    images: int
    skipped: list[int]  # image ids that could not be decoded
    seconds: float
    device: str
    actors: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {
            "images": self.images,
            "skipped_images": self.skipped,
            "detections": len(self.results),
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
            "device": self.device,
            "actors": self.actors,
        }


def run_inference(detector: Detector, shards_uri: str, cfg: InferenceConfig | None = None) -> Inference:
    """Every image of `shards_uri` through `detector` on the connected Ray cluster."""
    import ray
    from ray.data import ActorPoolStrategy

    from detr_ray.data.datasets import val_dataset

    cfg = (cfg or InferenceConfig()).validate()
    check_categories(detector, shards_uri)
    meta = read_meta(shards_uri)
    total = sum(s["rows"] for s in meta.shards)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0:
        raise InferenceError("use_gpu was asked for, but the Ray cluster has no GPUs")
    actors = cfg.actors or (gpus if use_gpu else 1)
    device = "gpu" if use_gpu else "cpu"
    log.info("inference of %s on %s: %d images, %d %s actor(s)", detector.checkpoint, shards_uri, total, actors, device)

    dataset = val_dataset(
        shards_uri, detector.transform, decode_batch_size=cfg.decode_batch_size, decode_num_cpus=cfg.decode_num_cpus
    )
    predictions = dataset.map_batches(
        Predictor,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cfg.cpus_per_actor,
        fn_constructor_kwargs={
            "model_config": to_dict(detector.model),
            "weights": ray.put(detector.weights),
            "label_to_category_id": detector.label_to_category_id,
            "use_gpu": use_gpu,
            "threads": max(1, math.floor(cfg.cpus_per_actor)),
        },
    )
    from tqdm import tqdm

    results: list[dict] = []
    skipped: list[int] = []
    seen = 0
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="inference", disable=not cfg.progress) as bar:
        for batch in predictions.iter_batches(batch_format="pyarrow", batch_size=None):
            cols = {name: batch.column(name).to_pylist() for name in PREDICTION_SCHEMA.names}
            for image_id, skip, cats, scores, boxes in zip(*(cols[n] for n in PREDICTION_SCHEMA.names)):
                if skip:
                    skipped.append(image_id)
                xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist()
                results += [
                    {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                    for c, s, b in zip(cats, scores, xywh)
                ]
            seen += batch.num_rows
            bar.update(batch.num_rows)
    seconds = time.perf_counter() - start
    if skipped:
        log.warning(
            "%d images of %s could not be decoded and have no detections: %s", len(skipped), shards_uri, skipped[:20]
        )
    if seen != total:
        raise InferenceError(f"{shards_uri}: inference saw {seen} images, the shards' meta lists {total}")
    results.sort(key=lambda r: r["image_id"])  # stable: query order within an image is kept
    return Inference(results, total, sorted(skipped), seconds, device, actors)
