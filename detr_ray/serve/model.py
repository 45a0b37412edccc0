"""What a detection endpoint serves, and the request path with no HTTP in it.

    choose_checkpoint(experiment=... | checkpoint=...)   the checkpoint to serve, chosen and
                                    verified as evaluate.py does it, and its identity
    ServedModel(spec)               loads it again (in each replica) only if it still matches the
                                    manifest verified when it was chosen
    prepare_image(body, ...)        one request's bytes -> val-transformed pixels, or a
                                    RequestError saying why not; IsolatedDecoder runs it in a
                                    child process
    ServedModel.predict([...])      a batch -> every query's detection per image
    ServedModel.answer(...)         one image's JSON answer, filtered by score

The image path is evaluate.py's, function for function: `decode_rgb` (images.py; its EXIF rule
with the stored size as the "annotation", so the pixels are used as stored and the tag is
ignored), the run's own val `DetectionTransform`, then the inference `Predictor` (pad into a
batch with a mask, normalize, DETR, postprocess, COCO xywh in pixels of the image as stored).
As in evaluate.py, an image's detections depend slightly on what it is batched with (the padding
up to the batch's largest image reaches the backbone); alone in its batch, an image gets exactly
evaluate.py's detections with --batch-size 1.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from detr_ray import checkpoint as ckpt
from detr_ray.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_rgb, stored_size
from detr_ray.data.recipe import TransformConfig

log = logging.getLogger(__name__)

DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_MAX_BODY_BYTES = 20 * 2**20


class RequestError(ValueError):
    """A request the endpoint refuses: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # raised in a decoding process, re-raised in the replica
        return RequestError, (self.status, str(self))


@dataclass
class ModelSpec:
    """Where a replica finds its model, and what it must be: the chosen checkpoint (a local
    directory or a URI each replica fetches itself) and its manifest as verified when chosen."""

    location: str
    manifest: dict
    identity: dict  # source, checkpoint, manifest_sha256, trial, ... (returned with every answer)
    # Published DETR weights: {"source", "data", "overrides", "sha256"}. Each replica converts the
    # file itself (a converted copy on the driver's disk is not on the other nodes) and serves it
    # only if the file it read has the sha256 chosen here.
    published: dict | None = None


def manifest_sha256(manifest: dict) -> str:
    """A short, stable hash of a checkpoint's manifest (which itself lists every file's SHA-256):
    two answers carry the same hash only if the same weights produced them."""
    import json

    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def choose_checkpoint(
    *,
    experiment: str | None = None,
    checkpoint: str | None = None,
    workdir: str | Path,
    data: str | None = None,
    overrides: list[str] = (),
) -> ModelSpec:
    """The verified checkpoint to serve: `checkpoint` itself, or an experiment's best.json
    checkpoint (the best trial of trials.json whose checkpoint verifies, when that one does not),
    chosen exactly as evaluate.py chooses it. EvaluationTargetError / CheckpointError otherwise. `workdir`
    holds copies of checkpoints behind URIs.

    `checkpoint` may also be published DETR weights (a file, URL or URI, as evaluate.py takes
    them): `data` then names the shards whose categories (_meta.json) the class head is mapped to,
    and `overrides` what the file cannot tell (model.dilation=...). Every category must map to one
    of the file's classes: a new class's row would be random, different in every replica."""
    from detr_ray.evaluation import subject

    if (experiment is None) == (checkpoint is None):
        raise ValueError("give exactly one of experiment, checkpoint")
    if (
        checkpoint is not None
        and not subject.storage.is_uri(checkpoint)
        and Path(checkpoint).is_file()
        and (Path(checkpoint).parent / ckpt.MANIFEST).is_file()
    ):
        raise subject.EvaluationTargetError(
            f"{checkpoint}: a file of the checkpoint directory {Path(checkpoint).parent}; give the directory"
        )
    if checkpoint is not None and subject.is_weights_file(checkpoint):
        return _choose_published(checkpoint, workdir, data, list(overrides))
    if data is not None or overrides:
        raise subject.EvaluationTargetError(
            "--data and --set apply to published DETR weights only; a checkpoint carries its own categories and "
            "settings"
        )
    if checkpoint is not None:
        if not subject.storage.is_uri(checkpoint) and Path(checkpoint).is_file():
            raise subject.EvaluationTargetError(
                f"{checkpoint}: a file that is not DETR weights; serving takes a detr-ray checkpoint directory "
                "(checkpoint_epochNNNN), published DETR weights (with --data) or an experiment directory (--experiment)"
            )
        try:
            directory, manifest = subject.fetch_checkpoint(checkpoint, workdir)
        except ckpt.CheckpointError as e:
            raise subject.EvaluationTargetError(str(e)) from e
        trial = None
        location = checkpoint
    else:
        chosen = subject.from_experiment(experiment, workdir)
        directory, manifest, trial = chosen.checkpoint, chosen.manifest, chosen.trial
        location = _chosen_location(experiment, chosen) or str(directory)
    identity = {
        "source": experiment or checkpoint,
        "checkpoint": location,
        "manifest_sha256": manifest_sha256(manifest),
    }
    if trial is not None:
        identity["trial"] = trial
    log.info("serving checkpoint %s (verified copy %s)", location, directory)
    # replicas fetch the checkpoint from where it lives (a URI works on every node), not from
    # this process's copy, and load it only if it still matches `manifest`
    return ModelSpec(location, manifest, identity)


def _choose_published(location: str, workdir: str | Path, data: str | None, overrides: list[str]) -> ModelSpec:
    from detr_ray.evaluation import subject

    published = subject.from_published(location, Path(workdir) / "chosen", data, overrides)
    new = [c["name"] for c in published.weights["load"]["classes"] if c["how"] == "new"]
    if new:
        raise subject.EvaluationTargetError(
            f"{location}: categories {new} of {data} are not among its classes; serving them would answer with "
            "freshly initialised rows (different in every replica). Fine-tune it on this data first, then serve that "
            "checkpoint"
        )
    identity = {
        "source": location,
        "checkpoint": location,
        "weights_sha256": published.weights["sha256"],
        "manifest_sha256": manifest_sha256(published.manifest),
    }
    log.info(
        "serving published weights %s (sha256 %s) on the categories of %s", location, published.weights["sha256"], data
    )
    return ModelSpec(
        location,
        published.manifest,
        identity,
        published={"source": location, "data": data, "overrides": overrides, "sha256": published.weights["sha256"]},
    )


def _chosen_location(experiment: str, chosen) -> str | None:
    """Where the experiment's chosen checkpoint lives (its trial's record, else best.json's)."""
    from detr_ray.evaluation import subject

    record = next((t for t in chosen.trials if str(t.get("trial")) == chosen.trial), None)
    if record and record.get("checkpoint"):
        return str(record["checkpoint"])
    try:
        best = subject._read_json(subject.storage.join(experiment, subject.BEST))
    except (FileNotFoundError, subject.EvaluationTargetError):
        return None
    return str(best.get("checkpoint")) if isinstance(best, dict) and best.get("checkpoint") else None


@dataclass
class Prepared:
    """One request's image after decoding and the val transform."""

    pixels: torch.Tensor  # uint8 [3, h, w], transformed
    width: int  # of the image as stored in the file
    height: int


def read_image(body: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, int, int]:
    """(uint8 [3, H, W] pixels, width, height) of encoded image bytes, or RequestError: empty
    (400), more pixels than `max_pixels` by the header (413, nothing decoded), not an image or
    undecodable, e.g. truncated (422)."""
    if not body:
        raise RequestError(400, "empty body: send the image's bytes (JPEG or PNG)")
    try:
        width, height = stored_size(body, max_pixels)
    except ImageTooLarge as e:
        raise RequestError(413, f"image too large: {e}") from None
    except ValueError as e:
        raise RequestError(422, f"not an image (JPEG or PNG): {_plain(e)}") from None
    if width < 1 or height < 1:
        raise RequestError(422, f"image has no pixels ({width}x{height})")
    try:
        pixels = decode_rgb(body, height, width)
    except RuntimeError as e:
        raise RequestError(422, f"cannot decode the image ({width}x{height} by its header): {_plain(e)}") from None
    if tuple(pixels.shape[-2:]) != (height, width):
        raise RequestError(422, f"decoded to {tuple(pixels.shape[-2:])} (h, w), the header says {height}x{width}")
    return pixels, width, height


_VAL_TRANSFORMS: dict = {}


def prepare_image(body: bytes, max_pixels: int, transform: TransformConfig) -> tuple[np.ndarray, int, int]:
    """(uint8 [3, h, w] val-transformed pixels, width, height as stored) of encoded bytes, or
    RequestError (see `read_image`): decode_augment's decode and val transform of one image."""
    from detr_ray.data.transforms import DetectionTransform

    key = repr(transform)
    if key not in _VAL_TRANSFORMS:
        _VAL_TRANSFORMS[key] = DetectionTransform(transform, train=False)
    pixels, width, height = read_image(body, max_pixels)
    image, _, _ = _VAL_TRANSFORMS[key](pixels, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    return image.numpy(), width, height


class IsolatedDecoder:
    """`prepare_image` in child processes. torchvision's native decoders can crash the process on
    hostile bytes (a PNG whose IDAT holds too little data segfaults decode_png in torchvision
    0.29), so the bytes of a request are decoded in a child: a crash kills the child, not the
    replica. Every request that was in the crashed pool is then decoded again alone, one at a
    time, in a process of its own: the one that crashes that too is refused (422), the others
    are answered."""

    def __init__(self, transform: TransformConfig, processes: int = 1):
        import asyncio
        import multiprocessing

        # spawn: forking a process that runs Ray's and torch's threads is unsafe
        self._context = multiprocessing.get_context("spawn")
        self.transform, self.processes = transform, processes
        self._pool = self._new_pool(processes)
        self._pool.submit(int).result()  # start the children now, not on the first request
        self._alone = None  # the pool of one for suspects, started on the first crash
        self._alone_lock = asyncio.Lock()

    def _new_pool(self, processes: int):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(processes, mp_context=self._context)

    async def _run(self, pool, body: bytes, max_pixels: int) -> Prepared:
        import asyncio

        pixels, width, height = await asyncio.wrap_future(pool.submit(prepare_image, body, max_pixels, self.transform))
        return Prepared(torch.from_numpy(pixels), width, height)

    async def prepare(self, body: bytes, max_pixels: int) -> Prepared:
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool
        try:
            return await self._run(pool, body, max_pixels)
        except BrokenProcessPool:
            if self._pool is pool:
                log.warning("an image decoding process died; starting a new one")
                self._pool = self._new_pool(self.processes)
                pool.shutdown(wait=False)
        async with self._alone_lock:
            self._alone = self._alone or self._new_pool(1)
            try:
                return await self._run(self._alone, body, max_pixels)
            except BrokenProcessPool:
                self._alone.shutdown(wait=False)
                self._alone = None
                log.warning("refused an image that crashes the decoder (%d bytes)", len(body))
                raise RequestError(422, "the image decoder crashed on these bytes (a malformed image)") from None

    def close(self) -> None:
        for pool in (self._pool, self._alone):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _plain(error: Exception) -> str:
    """A decoder's message without the C++ source location or object reprs in it."""
    lines = str(error).strip().splitlines()
    text = lines[-1] if lines else type(error).__name__
    text = re.sub(r"^.*?\.(cpp|h):\d+,\s*", "", text)
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", text)


class ServedModel:
    """A checkpoint ready to answer requests (one per Serve replica, or in-process)."""

    def __init__(self, spec: ModelSpec, *, use_gpu: bool = False, threads: int = 1, workdir: str | Path | None = None):
        from detr_ray.config import to_dict
        from detr_ray.evaluation.inference import Predictor, load_detector
        from detr_ray.evaluation.subject import fetch_checkpoint

        self.spec = spec
        self._workdir = tempfile.TemporaryDirectory(prefix="detr-serve-")  # a URI's copy, removed with this object
        if spec.published:
            directory, manifest = self._convert_published(spec.published, workdir or self._workdir.name)
        else:
            directory, _ = fetch_checkpoint(spec.location, workdir or self._workdir.name)
            manifest = spec.manifest
        self.detector = load_detector(directory, manifest)  # refuses any other weights than the chosen ones
        self.predictor = Predictor(
            to_dict(self.detector.model), self.detector.weights, self.detector.label_to_category_id, use_gpu, threads
        )
        self.device = str(self.predictor.device)
        self.detector.weights = None  # the predictor's model holds them
        self._label_of = {c: i for i, c in enumerate(self.detector.label_to_category_id)}

    @staticmethod
    def _convert_published(published: dict, workdir: str | Path) -> tuple[Path, dict]:
        from detr_ray.evaluation.subject import EvaluationTargetError, from_published

        subject = from_published(published["source"], workdir, published["data"], published["overrides"])
        if subject.weights["sha256"] != published["sha256"]:
            raise EvaluationTargetError(
                f"{published['source']}: its sha256 is now {subject.weights['sha256']}, "
                f"not {published['sha256']} as when it was chosen; not serving other weights"
            )
        return subject.checkpoint, subject.manifest

    @property
    def identity(self) -> dict:
        return {**self.spec.identity, "epoch": self.detector.epoch}

    def describe(self) -> dict:
        """What is loaded (GET /model)."""
        from detr_ray.config import to_dict
        from detr_ray.model.predict import IMAGENET_MEAN, IMAGENET_STD

        t = self.detector.transform
        return {
            "model": self.identity,
            "arch": to_dict(self.detector.model),
            "categories": [
                {"label": i, "id": c, "name": n}
                for i, (c, n) in enumerate(zip(self.detector.label_to_category_id, self.detector.names))
            ],
            "input": {
                "resize": {"shortest_side": t.val_scale, "max_size": t.max_size},
                "color": "RGB",
                "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            },
            "metrics": self.detector.metrics,
            "device": self.device,
        }

    def prepare(self, body: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
        """`prepare_image` in this process (IsolatedDecoder does it in a child)."""
        pixels, width, height = prepare_image(body, max_pixels, self.detector.transform)
        return Prepared(torch.from_numpy(pixels), width, height)

    def predict(self, images: list[Prepared]) -> list[list[dict]]:
        """Every query's detection per image (Predictor: pad, normalize, DETR, postprocess):
        [{"category_id", "score", "bbox": COCO xywh pixels of the original image}], query order."""
        from detr_ray.data.decode import DECODED_SCHEMA

        rows = {
            "image_id": list(range(len(images))),
            "image": [p.pixels.permute(1, 2, 0).contiguous().numpy().tobytes() for p in images],
            "height": [int(p.pixels.shape[-2]) for p in images],
            "width": [int(p.pixels.shape[-1]) for p in images],
            "orig_height": [p.height for p in images],
            "orig_width": [p.width for p in images],
            "boxes": [[] for _ in images],
            "labels": [[] for _ in images],
            "skipped": [False for _ in images],
        }
        out = self.predictor(pa.Table.from_pydict(rows, schema=DECODED_SCHEMA))
        by_id = {
            i: [
                {"category_id": c, "score": s, "bbox": b}
                for c, s, b in zip(cats, scores, np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist())
            ]
            for i, cats, scores, boxes in zip(
                *(out.column(n).to_pylist() for n in ("image_id", "category_ids", "scores", "boxes"))
            )
        }
        return [by_id[i] for i in range(len(images))]

    def answer(self, detections: list[dict], score_threshold: float, image: Prepared) -> dict:
        """The JSON answer for one image: detections scoring >= score_threshold, best first."""
        kept = []
        for d in sorted(detections, key=lambda d: -d["score"]):
            if d["score"] < score_threshold:
                break
            x, y, w, h = d["bbox"]
            label = self._label_of[d["category_id"]]
            kept.append(
                {
                    "score": d["score"],
                    "label": label,
                    "category_id": d["category_id"],
                    "category": self.detector.names[label],
                    "xyxy": [x, y, x + w, y + h],
                    "xywh": [x, y, w, h],
                }
            )
        return {
            "detections": kept,
            "image": {"width": image.width, "height": image.height},
            "score_threshold": score_threshold,
            "model": self.identity,
        }


def check_threshold(value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RequestError(400, f"score_threshold must be a number in [0, 1], got {value!r}")
    return float(value)
