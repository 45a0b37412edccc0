"""A checkpoint's DETR as a `torch.export` program, for use outside Ray and outside this package.

Why torch.export: in torch 2.14 it traces this DETR (ResNet, sine position embedding computed
from the mask, nn.MultiheadAttention encoder/decoder) in non-strict mode with the batch size,
height and width all dynamic, and the program's outputs equal the eager model's (bit for bit on
the CPU in tests/serve/test_export.py; the stated tolerance is 1e-5). TorchScript is in
maintenance and would script nn.MultiheadAttention's Python paths; ONNX would need the `onnx`
package (not a dependency) and an opset choice for the same graph. A `.pt2` file loads with
`torch.export.load` in any torch >= the one that wrote it and runs on CPU or GPU, or goes on to
AOTInductor / ExecuTorch.

The program (`model.pt2`):
    inputs   images uint8 [B, 3, H, W]  RGB, each image resized as the run's val transform does
                                        (shortest side `val_scale`, longest <= `max_size`:
                                        model.json), zero-padded on the right and bottom to the
                                        batch's largest H, W
             mask   bool  [B, H, W]     True on padding
    outputs  pred_logits float [B, Q, K+1]  (last: "no object")
             pred_boxes  float [B, Q, 4]    cx, cy, w, h as fractions of each unpadded image
ImageNet normalization is inside; post-processing is not (softmax, drop "no object", best class,
boxes times the original width/height: detr_ray/model/postprocess.py, a few lines, described in
model.json). H and W must be at least MIN_SIDE (a side of 32 pixels or fewer leaves the
backbone a 1-pixel feature map, which tracing specializes); pad a smaller image up to it.

`model.json` next to it: the model's identity (checkpoint, manifest hash), architecture,
categories (label -> category id, name), the input resize and normalization.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

MIN_SIDE = 33
MAX_SIDE = 4096
MAX_BATCH = 256
PROGRAM = "model.pt2"
METADATA = "model.json"
TOLERANCE = 1e-5  # |exported - eager|, logits and boxes


class Exportable(nn.Module):
    """uint8 padded images + mask -> (pred_logits, pred_boxes) of the last decoder layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        from detr_ray.model.predict import normalize

        out = self.model(normalize(images), mask)
        return out["pred_logits"], out["pred_boxes"]


def export_model(model: nn.Module) -> torch.export.ExportedProgram:
    """`model` (eval mode is set) as a program with dynamic batch, height and width."""
    wrapped = Exportable(model.eval()).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    images = torch.zeros(2, 3, 96, 128, dtype=torch.uint8)  # sizes away from the bounds: no specialization
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    with torch.no_grad():
        return torch.export.export(
            wrapped,
            (images, mask),
            dynamic_shapes={"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}},
        )


def max_difference(program: torch.export.ExportedProgram, model: nn.Module, images: Tensor, mask: Tensor) -> float:
    """Largest |exported - eager| over logits and boxes on one padded batch."""
    eager = Exportable(model.eval()).eval()
    with torch.no_grad():
        want = eager(images, mask)
        got = program.module()(images, mask)
    return max(float((a - b).abs().max()) for a, b in zip(got, want))


def random_padded_batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random uint8 images of (h, w) `sizes`, zero-padded into one batch with its mask."""
    g = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        mask[i, :h, :w] = False
    return images, mask


CHECK_BATCHES = [[(64, 64)], [(80, 120), (96, 71)], [(150, 97), (33, 40), (120, 150)]]


def export_detector(detector, identity: dict, out: str | Path) -> dict:
    """Writes `out`/model.pt2 and `out`/model.json for a loaded Detector (evaluation/inference.py)
    and checks the program against the eager model on CHECK_BATCHES (padded, several sizes).
    Returns model.json's content, with the check's largest difference. `out` must be new, empty or
    an earlier export's (ownership.claim)."""
    from detr_ray.config import to_dict
    from detr_ray.model import build_model
    from detr_ray.model.predict import IMAGENET_MEAN, IMAGENET_STD
    from detr_ray.ownership import claim

    out = claim(out, "export")
    model = build_model(detector.model)
    model.load_state_dict(detector.weights)
    model.eval()
    program = export_model(model)
    difference = max(
        max_difference(program, model, *random_padded_batch(sizes, seed)) for seed, sizes in enumerate(CHECK_BATCHES)
    )
    if difference > TOLERANCE:
        raise RuntimeError(
            f"the exported program differs from the eager model by {difference:.3g} (tolerance {TOLERANCE})"
        )
    torch.export.save(program, out / PROGRAM)
    t = detector.transform
    metadata = {
        "model": identity,
        "arch": to_dict(detector.model),
        "categories": [
            {"label": i, "id": c, "name": n}
            for i, (c, n) in enumerate(zip(detector.label_to_category_id, detector.names))
        ],
        "input": {
            "resize": {"shortest_side": t.val_scale, "max_size": t.max_size, "antialias": True},
            "color": "RGB",
            "dtype": "uint8",
            "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "inside_program": True},
            "min_side": MIN_SIDE,
            "max_side": MAX_SIDE,
            "max_batch": MAX_BATCH,
        },
        "outputs": {
            "pred_logits": "[B, Q, K+1]; softmax, drop the last (no object), best class -> label, score",
            "pred_boxes": (
                "[B, Q, 4] cx, cy, w, h as fractions of the unpadded image; times the original width/height -> pixels"
            ),
        },
        "torch": torch.__version__,
        "check": {"max_abs_difference": difference, "tolerance": TOLERANCE, "batches": CHECK_BATCHES},
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=2))
    log.info(
        "exported %s to %s (largest difference to eager %.3g)", identity.get("checkpoint"), out / PROGRAM, difference
    )
    return metadata


def load_program(directory: str | Path):
    """(the exported program's callable module, model.json) of an export directory."""
    directory = Path(directory)
    program = torch.export.load(directory / PROGRAM)
    return program.module(), json.loads((directory / METADATA).read_text())
