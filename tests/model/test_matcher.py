import itertools

import numpy as np
import torch

from detr_ray.model import HungarianMatcher


def _giou_xyxy(a, b):
    """Plain-python GIoU, independent of torchvision."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    union = area(a) + area(b) - inter
    enc = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enc - union) / enc


def _xyxy(b):
    cx, cy, w, h = b
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _cost(logits, pred, labels, tgt, i, j):
    prob = torch.softmax(logits[i], -1)[labels[j]].item()
    l1 = float((pred[i] - tgt[j]).abs().sum())
    giou = _giou_xyxy(_xyxy(pred[i].tolist()), _xyxy(tgt[j].tolist()))
    return -1 * prob + 5 * l1 - 2 * giou


def _random_case(q, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, k + 1, generator=g) * 2
    pred = torch.cat([torch.rand(q, 2, generator=g) * 0.6 + 0.2, torch.rand(q, 2, generator=g) * 0.3 + 0.05], 1)
    labels = torch.randint(0, k, (n,), generator=g)
    tgt = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
    return logits, pred, labels, tgt


def test_matches_brute_force_optimum():
    matcher = HungarianMatcher()
    for seed in range(20):
        q, n = 5, 1 + seed % 4
        logits, pred, labels, tgt = _random_case(q, n, 3, seed)
        ((rows, cols),) = matcher(
            {"pred_logits": logits[None], "pred_boxes": pred[None]}, [{"labels": labels, "boxes": tgt}]
        )
        assert len(rows) == n and sorted(cols.tolist()) == list(range(n))
        got = sum(_cost(logits, pred, labels, tgt, i, j) for i, j in zip(rows.tolist(), cols.tolist()))
        best = min(
            sum(_cost(logits, pred, labels, tgt, qi, j) for j, qi in enumerate(perm))
            for perm in itertools.permutations(range(q), n)
        )
        assert np.isclose(got, best, atol=1e-5), (seed, got, best)


def test_batch_equals_per_image_and_handles_empty_images():
    matcher = HungarianMatcher()
    cases = [_random_case(6, n, 4, seed) for seed, n in enumerate([3, 0, 5, 1])]
    outputs = {
        "pred_logits": torch.stack([c[0] for c in cases]),
        "pred_boxes": torch.stack([c[1] for c in cases]),
    }
    targets = [{"labels": c[2], "boxes": c[3]} for c in cases]
    batched = matcher(outputs, targets)
    for b, case in enumerate(cases):
        single = matcher({"pred_logits": case[0][None], "pred_boxes": case[1][None]}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    assert batched[1][0].dtype == torch.int64


def test_all_images_empty():
    matcher = HungarianMatcher()
    out = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    assert all(len(r) == 0 and len(c) == 0 for r, c in matcher(out, [empty, empty]))


def test_obvious_assignment():
    # Query 2 sits on target 0 with its class; query 0 sits on target 1 with its class.
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, 2, 1] = 5
    logits[0, 0, 0] = 5
    pred = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.3, 0.3, 0.2, 0.2]]])
    tgt = {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}
    rows, cols = HungarianMatcher()({"pred_logits": logits, "pred_boxes": pred}, [tgt])[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_non_finite_predictions_are_an_error():
    import pytest

    out = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4)}
    out["pred_boxes"][0, 2, 0] = float("nan")
    tgt = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(out, [tgt])
