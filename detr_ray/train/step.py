"""One DETR optimisation step, shared by the Ray Train loop and benchmarks/train_step.py.

normalize on the device -> forward (optionally under bf16/fp16 autocast) -> Hungarian matching
and set loss in fp32 -> backward -> clip at max-norm -> AdamW step. The step returns detached
loss tensors and never synchronises with the host, so a caller can log asynchronously.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr_ray.model.criterion import SetCriterion
from detr_ray.model.detectors import computes_own_loss, parameter_groups
from detr_ray.model.predict import normalize

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass
class StepOptions:
    precision: str = "fp32"  # fp32 | tf32 (matmuls too) | bf16 (autocast) | fp16 (autocast + GradScaler)
    channels_last: bool = False
    clip_max_norm: float = 0.1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")


def build_optimizer(
    model: nn.Module, lr: float, lr_backbone: float, weight_decay: float, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with two groups (backbone at lr_backbone, everything else at lr), DETR-style, for
    any model.arch (detectors.parameter_groups). fused=None picks the fused kernel on CUDA."""
    groups = parameter_groups(model, lr, lr_backbone)
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


def autocast_context(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


class TrainStep:
    """Callable training step bound to one model, criterion and optimizer."""

    def __init__(
        self,
        model: nn.Module,
        criterion: SetCriterion | None,  # None: the model computes its own losses (detectors.py)
        optimizer: torch.optim.Optimizer,
        options: StepOptions | None = None,
    ):
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.options = options or StepOptions()
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.criterion is not None:
            self.criterion.to(self.device)
        if self.device.type == "cuda":
            # Process-wide switches, set both ways: "fp32" keeps PyTorch's defaults (fp32 matmuls,
            # cuDNN free to use TF32 in convolutions), "tf32" allows TF32 in matmuls too.
            torch.backends.cuda.matmul.allow_tf32 = self.options.precision == "tf32"
            torch.backends.cudnn.allow_tf32 = True
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.options.precision == "fp16")
        if self.options.channels_last:
            model.to(memory_format=torch.channels_last)

    def forward_loss(self, images: Tensor, mask: Tensor, targets: list[dict]) -> tuple[Tensor, dict]:
        """Objective and loss dict for one batch (no optimizer step)."""
        x = normalize(images.to(self.device, non_blocking=True), self.options.channels_last)
        mask = mask.to(self.device, non_blocking=True)
        targets = [
            {
                "labels": t["labels"].to(self.device, non_blocking=True),
                "boxes": t["boxes"].to(self.device, non_blocking=True),
            }
            for t in targets
        ]
        if computes_own_loss(self.model):  # a torchvision detector: its own losses, summed
            with autocast_context(self.device, self.options.precision):
                losses = {k: v.float() for k, v in self.model(x, mask, targets).items()}
            return sum(losses.values()), losses
        with autocast_context(self.device, self.options.precision):
            outputs = self.model(x, mask)
        losses = self.criterion(outputs, targets)  # fp32: the criterion casts its inputs
        return self.criterion.weighted_total(losses), losses

    def __call__(self, images: Tensor, mask: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        self.model.train()
        total, losses = self.forward_loss(images, mask, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.options.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.options.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out = {k: v.detach() for k, v in losses.items()}
        out["loss"] = total.detach()
        return out
