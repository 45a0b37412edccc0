import pytest
import torch

from detr_ray.model import build_criterion, build_model
from detr_ray.train.step import StepOptions, TrainStep, build_optimizer
from tests.conftest import random_batch, tiny_config


def _step(precision="fp32", channels_last=False, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = build_model(cfg)
    opt = build_optimizer(model, lr=1e-3, lr_backbone=1e-4, weight_decay=1e-4, fused=False)
    return model, TrainStep(
        model, build_criterion(cfg), opt, StepOptions(precision=precision, channels_last=channels_last)
    )


def test_optimizer_groups_and_step_updates_only_trainable_parameters():
    model, step = _step()
    groups = {g["name"]: g for g in step.optimizer.param_groups}
    assert groups["transformer"]["lr"] == 1e-3 and groups["backbone"]["lr"] == 1e-4
    backbone_ids = {id(p) for p in groups["backbone"]["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (id(p) in backbone_ids) == name.startswith("backbone.")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = step(*random_batch())
    assert torch.isfinite(out["loss"]) and "grad_norm" in out
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == p.requires_grad or n.startswith("transformer.decoder.layers.0.self_attn.in_proj"), n
    for n, b in model.named_buffers():  # FrozenBatchNorm statistics never move
        assert torch.equal(buffers[n], b), n


def test_gradient_clipping_bounds_the_update_norm():
    model, step = _step()
    step(*random_batch())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert total <= 0.1 + 1e-4


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precision_gives_the_same_losses(precision):
    batch = random_batch(seed=4)
    _, ref = _step("fp32")
    _, other = _step(precision)
    a = ref.forward_loss(*batch)[1]
    b = other.forward_loss(*batch)[1]
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(a[k], b[k], rtol=5e-2, atol=1e-2)
        assert b[k].dtype == torch.float32  # the loss itself is computed in fp32


def test_channels_last_is_the_same_math():
    batch = random_batch(seed=5)
    _, ref = _step("fp32")
    _, cl = _step("fp32", channels_last=True)
    torch.testing.assert_close(ref.forward_loss(*batch)[0], cl.forward_loss(*batch)[0], rtol=1e-4, atol=1e-5)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        StepOptions(precision="fp8")
