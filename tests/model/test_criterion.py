import math

import torch

from detr_ray.model import HungarianMatcher, SetCriterion, build_criterion, build_model
from detr_ray.model.predict import normalize
from tests.conftest import random_batch, tiny_config


def test_hand_computed_losses():
    # One image, two queries, two classes (+ no-object), one target of class 1.
    logits = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]])
    pred = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.9, 0.9, 0.1, 0.1]]])  # query 0 is the match
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    crit = SetCriterion(2, HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, eos_coef=0.1)
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, targets)

    lse0 = math.log(math.exp(0) + math.exp(2) + math.exp(0))
    lse1 = math.log(math.exp(1) + math.exp(0) + math.exp(3))
    ce0 = lse0 - 2.0  # query 0 -> class 1, weight 1
    ce1 = lse1 - 3.0  # query 1 -> no object, weight 0.1
    assert math.isclose(losses["loss_ce"].item(), (ce0 + 0.1 * ce1) / 1.1, rel_tol=1e-6)
    # L1 between (0.25,0.25,0.5,0.5) and (0.5,0.5,0.5,0.5), one box.
    assert math.isclose(losses["loss_bbox"].item(), 0.5, rel_tol=1e-6)
    # xyxy (0,0,.5,.5) vs (.25,.25,.75,.75): IoU 1/7, enclosing .5625, union .4375.
    giou = (1 / 7) - (0.5625 - 0.4375) / 0.5625
    assert math.isclose(losses["loss_giou"].item(), 1 - giou, rel_tol=1e-5)
    assert losses["class_error"].item() == 0.0
    # Both queries predict something other than no-object? query 0 argmax=1 (object), query 1 argmax=2 (none).
    assert losses["cardinality_error"].item() == 0.0
    total = crit.weighted_total(losses)
    expected = losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]
    assert torch.allclose(total, expected)


def test_box_losses_normalized_by_box_count_and_empty_images():
    crit = SetCriterion(2, HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2})
    pred = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]], [[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]]])
    logits = torch.zeros(2, 2, 3)
    # Image 0: both queries exactly on targets (L1 = 0, GIoU = 1); image 1: no objects.
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": pred[0].clone()},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, targets)
    assert losses["loss_bbox"].item() < 1e-7 and losses["loss_giou"].item() < 1e-6
    # Shift one box: L1 grows by the shift / 2 boxes.
    targets[0]["boxes"] = targets[0]["boxes"].clone()
    targets[0]["boxes"][0, 0] += 0.1
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, targets)
    assert math.isclose(losses["loss_bbox"].item(), 0.1 / 2, rel_tol=1e-5)
    # All images empty: only the classification loss, box losses are zero (not NaN).
    empty = [targets[1], targets[1]]
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert math.isclose(losses["loss_ce"].item(), math.log(3), rel_tol=1e-6)


def test_aux_losses_named_per_layer():
    cfg = tiny_config(dec_layers=3)
    model = build_model(cfg).eval()
    crit = build_criterion(cfg)
    images, mask, targets = random_batch()
    losses = crit(model(normalize(images), mask), targets)
    for suffix in ("", "_0", "_1"):
        for name in ("loss_ce", "loss_bbox", "loss_giou"):
            assert name + suffix in losses
            assert name + suffix in crit.weight_dict
    assert "loss_ce_2" not in losses
    assert {"class_error", "cardinality_error"} <= set(losses)


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.1)
    model = build_model(cfg).train()
    crit = build_criterion(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.normal_(0, 0.05)
    images, mask, targets = random_batch(batch=2, max_boxes=3)
    crit.weighted_total(crit(model(normalize(images), mask), targets)).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen, "the stem and layer1 must be frozen"
    assert all(n.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1")) for n in frozen)
    # The first decoder layer's self-attention sees zeros as values (DETR's decoder input), so
    # its value projection weight gets an exactly-zero gradient, as in the reference: the values
    # are the bias alone. (Biases are randomised above so that zero-initialised ones do not hide
    # a gradient path.)
    value_rows = slice(2 * cfg.hidden_dim, 3 * cfg.hidden_dim)
    zero_by_design = {"transformer.decoder.layers.0.self_attn.in_proj_weight"}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reaches {name}"
            if name in zero_by_design:
                assert p.grad[value_rows].abs().sum() == 0
                assert p.grad[: 2 * cfg.hidden_dim].abs().sum() > 0
            else:
                assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    # FrozenBatchNorm statistics are buffers, never parameters.
    assert not any("bn" in n for n, _ in model.named_parameters())


def test_each_aux_layer_is_matched_and_scored_on_its_own():
    torch.manual_seed(3)
    cfg = tiny_config(dec_layers=3)
    model = build_model(cfg).eval()
    crit = build_criterion(cfg)
    images, mask, targets = random_batch(batch=3, max_boxes=4, seed=7)
    with torch.no_grad():
        out = model(normalize(images), mask)
        together = crit(out, targets)
        for i, aux in enumerate(out["aux_outputs"]):
            alone = crit(aux, targets)
            for k in ("loss_ce", "loss_bbox", "loss_giou"):
                torch.testing.assert_close(together[f"{k}_{i}"], alone[k])
