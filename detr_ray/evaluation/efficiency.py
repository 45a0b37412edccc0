"""What a checkpoint's detector costs, measured where the evaluation runs: parameters, GFLOPs at
the val resolution, inference latency at batch 1 (p50/p90), and the training throughput its run
recorded. Columns of `evaluate.py --compare`, so that every detector is measured on the same
machine in the same run.

The val images are decoded and resized by the run's own val transform (as inference does), one
at a time: latency covers normalisation, the model and detections in pixels (detectors.predict),
not decoding. FLOPs are torch.utils.flop_counter's count of one forward pass (2 per
multiply-add, convolutions and matrix products; NMS and other ops it does not know count zero),
averaged over the first `flop_images` val images.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from detr_ray.data.images import decode_rgb
from detr_ray.data.shards import read_shard_table
from detr_ray.data.transforms import DetectionTransform
from detr_ray.evaluation.inference import Detector

log = logging.getLogger(__name__)


def _val_images(detector: Detector, val_uri: str, n: int) -> list[tuple[torch.Tensor, dict]]:
    """The first `n` decodable val images after the val transform, with their orig_size."""
    table = read_shard_table(val_uri, ["image_id", "image", "height", "width"]).slice(0, 4 * n).to_pylist()
    transform = DetectionTransform(detector.transform, train=False)
    out = []
    for row in table:
        try:
            pixels = decode_rgb(row["image"], row["height"], row["width"])
        except Exception as e:  # counted by inference already; not timed here
            log.warning("image %s left out of the latency measurement: %s", row["image_id"], e)
            continue
        image, _, _ = transform(pixels, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
        out.append((image, {"orig_size": torch.tensor(pixels.shape[-2:])}))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def measure(
    detector: Detector,
    val_uri: str,
    *,
    images: int = 20,
    warmup: int = 3,
    flop_images: int = 3,
    device: str | None = None,
) -> dict:
    """{"parameters", "gflops", "resolution" (mean h, w of the FLOP-counted images),
    "latency_ms": {"p50", "p90", "mean"}, "latency_images", "device", "threads",
    "train_images_per_s" (the checkpoint's last recorded epoch; None when absent)}."""
    from torch.utils.flop_counter import FlopCounterMode

    from detr_ray.model.detectors import build, predict
    from detr_ray.model.predict import normalize

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build(detector.model)
    model.load_state_dict(detector.weights)
    # No parameter requires grad: FlopCounterMode's module tracker hooks the autograd graph of
    # every module input, and a parameter passed as one (DETR's queries) has none under no_grad.
    model.to(dev).eval().requires_grad_(False)
    samples = _val_images(detector, val_uri, images)
    if not samples:
        raise ValueError(f"{val_uri}: no decodable val image to measure {detector.checkpoint} on")

    def run(image, target):
        x = normalize(image[None].to(dev))
        mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=dev)
        return predict(model, x, mask, [target])

    flops, sizes = [], []
    for image, target in samples[:flop_images]:
        counter = FlopCounterMode(display=False)
        with counter:
            run(image, target)
        flops.append(counter.get_total_flops())
        sizes.append(image.shape[-2:])
    for image, target in samples[:warmup]:
        run(image, target)
    times = []
    for image, target in samples:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        run(image, target)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - start) * 1000)
    train_ips = detector.metrics.get("train/images_per_s")
    return {
        "arch": detector.model.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gflops": float(np.mean(flops)) / 1e9,
        "resolution": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))],
        "latency_ms": {
            "p50": float(np.percentile(times, 50)),
            "p90": float(np.percentile(times, 90)),
            "mean": float(np.mean(times)),
        },
        "latency_images": len(times),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "train_images_per_s": float(train_ips) if isinstance(train_ips, (int, float)) else None,
    }
