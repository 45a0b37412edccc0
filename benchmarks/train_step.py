"""Throughput and peak memory of one full DETR training step on synthetic batches.

The step is the trainer's own (detr_ray.train.step.TrainStep): normalize -> forward -> Hungarian
matching -> set loss with auxiliary layers -> backward -> clip 0.1 -> AdamW. Batches are
synthetic uint8 images already on the device with 1-14 boxes each, so the figure is the step
alone (the data pipeline has its own benchmark).

  python benchmarks/train_step.py --preset gpu      # the lever table at 800x1066 (GPU)
  python benchmarks/train_step.py --preset cpu      # a small table that runs on a laptop
  python benchmarks/train_step.py --backbone resnet101 --batch 4 --precision bf16 --size 800x1066

Prints a table and writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from detr_ray.model import DETRConfig, build_criterion, build_model
from detr_ray.model.backbone import calibrate_frozen_batchnorm
from detr_ray.model.predict import normalize
from detr_ray.train.step import StepOptions, TrainStep, build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setting:
    backbone: str = "resnet50"
    batch: int = 8
    height: int = 800
    width: int = 1066
    precision: str = "fp32"
    channels_last: bool = False
    fused: bool = False

    def label(self) -> str:
        extras = (
            [self.precision]
            + (["channels_last"] if self.channels_last else [])
            + (["fused AdamW"] if self.fused else [])
        )
        return f"{self.backbone} {'+'.join(extras)} b{self.batch} {self.height}x{self.width}"


PRESETS = {
    # The reference's measured table (issue 8) at the same size, then this project's levers.
    "gpu": [
        Setting(batch=4),
        Setting(batch=8),
        Setting(batch=8, precision="tf32"),
        Setting(batch=8, precision="bf16"),
        Setting(batch=8, precision="bf16", channels_last=True),
        Setting(batch=8, precision="bf16", channels_last=True, fused=True),
        Setting(batch=16, precision="bf16", channels_last=True, fused=True),
        Setting(backbone="resnet101", batch=4),
        Setting(backbone="resnet101", batch=8, precision="bf16", channels_last=True, fused=True),
    ],
    "cpu": [
        Setting(batch=2, height=320, width=427),
        Setting(batch=2, height=320, width=427, precision="bf16"),
        Setting(batch=2, height=320, width=427, channels_last=True),
    ],
}


def synthetic_batches(n: int, s: Setting, num_classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.randint(0, 256, (s.batch, 3, s.height, s.width), dtype=torch.uint8, generator=g)
        mask = torch.zeros(s.batch, s.height, s.width, dtype=torch.bool)
        targets = []
        for _ in range(s.batch):
            k = int(torch.randint(1, 15, (1,), generator=g))
            cxcy = torch.rand(k, 2, generator=g) * 0.6 + 0.2
            wh = torch.rand(k, 2, generator=g) * 0.35 + 0.02
            targets.append(
                {
                    "labels": torch.randint(0, num_classes, (k,), generator=g).to(device),
                    "boxes": torch.cat([cxcy, wh], 1).to(device),
                }
            )
        batches.append((images.to(device), mask.to(device), targets))
    return batches


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_step(s: Setting, device: torch.device, calibration_images: torch.Tensor, seed: int = 0) -> TrainStep:
    torch.manual_seed(seed)
    cfg = DETRConfig(backbone=s.backbone, num_classes=91)
    model = build_model(cfg).to(device)
    # No pretrained weights here: give the frozen BatchNorm layers real statistics so activations
    # stay finite (a random ResNet-101 with identity statistics overflows).
    calibrate_frozen_batchnorm(model.backbone, normalize(calibration_images))
    opt = build_optimizer(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, fused=s.fused)
    return TrainStep(
        model, build_criterion(cfg).to(device), opt, StepOptions(precision=s.precision, channels_last=s.channels_last)
    )


def run(s: Setting, device: torch.device, steps: int, warmup: int, profile: bool = False) -> dict:
    batches = synthetic_batches(min(steps, 4), s, 91, device)
    step = build_step(s, device, batches[0][0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        out = step(*batches[i % len(batches)])
    loss = float(out["loss"])  # the one host sync of the timed window
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if profile:
        print_profile(step, batches, device)
    row = asdict(s) | {
        "setting": s.label(),
        "images_per_s": round(steps * s.batch / dt, 2),
        "step_ms": round(dt / steps * 1000, 1),
        "final_loss": round(loss, 4),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del step, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_profile(step: TrainStep, batches, device: torch.device, n: int = 3) -> None:
    """Top operators of a few steps, by device time (CPU time on a CPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(n):
            step(*batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def same_math(s: Setting, device: torch.device) -> dict:
    """Losses of the reduced-precision forward vs the fp32 one, same weights, same batch."""
    batch = synthetic_batches(1, s, 91, device, seed=1)[0]
    ref = build_step(Setting(**(asdict(s) | {"precision": "fp32", "channels_last": False})), device, batch[0])
    other = build_step(s, device, batch[0])
    ref.model.eval(), other.model.eval()  # no dropout: compare the math, not the noise
    with torch.no_grad():
        a = ref.forward_loss(*batch)[1]
        b = other.forward_loss(*batch)[1]
    keys = ("loss_ce", "loss_bbox", "loss_giou")
    rel = {k: abs(float(a[k]) - float(b[k])) / max(abs(float(a[k])), 1e-8) for k in keys}
    return {
        "setting": s.label(),
        "fp32": {k: float(a[k]) for k in keys},
        "other": {k: float(b[k]) for k in keys},
        "max_rel_diff": max(rel.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", default="800x1066", help="HxW")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fused", action="store_true", help="fused AdamW (CUDA)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--profile", action="store_true", help="print the top operators of the first setting")
    args = p.parse_args()

    device = torch.device(args.device)
    if args.preset:
        settings = PRESETS[args.preset]
    else:
        h, w = (int(v) for v in args.size.lower().split("x"))
        settings = [Setting(args.backbone, args.batch, h, w, args.precision, args.channels_last, args.fused)]
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up")
    rows = []
    print(f"{'setting':<60} {'img/s':>8} {'ms/step':>8} {'peak GiB':>9}")
    for i, s in enumerate(settings):
        row = run(s, device, args.steps, args.warmup, profile=args.profile and i == 0)
        rows.append(row)
        mem = row.get("peak_memory_gib", row.get("peak_rss_gib"))
        print(f"{row['setting']:<60} {row['images_per_s']:>8.1f} {row['step_ms']:>8.1f} {mem:>9.2f}", flush=True)
    checks = []
    # Same weights, same batch: the fastest reduced-precision setting against fp32.
    reduced = [s for s in settings if s.precision in ("bf16", "fp16")] or [s for s in settings if s.precision != "fp32"]
    if reduced:
        c = same_math(reduced[-1], device)
        checks.append(c)
        print(f"same math vs fp32: {c['setting']}: max relative loss difference {c['max_rel_diff']:.2e}")
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"train_step_{slug}.json"
    payload = {
        "device": name,
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "results": rows,
        "same_math": checks,
        "command": "python benchmarks/train_step.py " + (f"--preset {args.preset}" if args.preset else "(custom)"),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
