import argparse
import logging

import pytest
import torch
import torchvision
from torch import nn

from detr_ray import checkpoint as ckpt
from detr_ray.data.coco import load_coco
from detr_ray.data.shards import read_meta, write_shards
from detr_ray.model import WeightsError, build_model, load_pretrained
from detr_ray.model.predict import normalize
from detr_ray.model.weights import COCO_CATEGORIES
from tests.conftest import random_batch, tiny_config
from tests.data.conftest import make_coco


class NotATensor:
    def __init__(self):
        self.payload = "code"


def _outputs(model):
    images, mask, _ = random_batch(seed=3)
    with torch.no_grad():
        return model.eval()(normalize(images), mask)


def _save_reference(model, path, **extra):
    """A checkpoint as the reference repository writes it: {"model": state_dict, ...}."""
    torch.save({"model": model.state_dict(), **extra}, path)


def test_reference_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    src = build_model(tiny_config(num_classes=91))
    path = tmp_path / "detr-tiny.pth"
    _save_reference(src, path)
    torch.manual_seed(2)
    dst = build_model(tiny_config(num_classes=91))
    report = load_pretrained(dst, path)
    assert report.kind == "detr" and not report.skipped and not report.reinitialized
    assert set(report.loaded) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    a, b = _outputs(src), _outputs(dst)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_reference_training_checkpoint_with_args_namespace(tmp_path):
    src = build_model(tiny_config())
    path = tmp_path / "checkpoint.pth"
    opt = torch.optim.AdamW(src.parameters())
    _save_reference(
        src, path, optimizer=opt.state_dict(), epoch=3, args=argparse.Namespace(lr=1e-4, backbone="resnet18")
    )
    report = load_pretrained(build_model(tiny_config()), path)
    assert len(report.loaded) == len(src.state_dict())


def test_class_count_change_reinitialises_only_the_class_head(tmp_path, caplog):
    torch.manual_seed(1)
    coco = build_model(tiny_config(num_classes=91))
    path = tmp_path / "coco.pth"
    _save_reference(coco, path)
    mine = build_model(tiny_config(num_classes=3))
    with caplog.at_level(logging.WARNING):
        report = load_pretrained(mine, path)
    assert set(report.reinitialized) == {"class_embed"}
    assert "class_embed" in caplog.text and "92" in caplog.text
    assert set(report.skipped) == {"class_embed.weight", "class_embed.bias"}
    for k, v in coco.state_dict().items():
        if not k.startswith("class_embed."):
            assert torch.equal(v, mine.state_dict()[k]), k
    assert mine.class_embed.weight.shape == (4, 32)


def test_r50_to_r101_transfer_keeps_everything_but_the_backbone(tmp_path):
    torch.manual_seed(1)
    r50 = build_model(tiny_config(backbone="resnet50"))
    path = tmp_path / "r50.pth"
    _save_reference(r50, path)
    r101 = build_model(tiny_config(backbone="resnet101"))
    backbone_before = {k: v.clone() for k, v in r101.state_dict().items() if k.startswith("backbone.")}
    report = load_pretrained(r101, path)
    assert not report.reinitialized
    assert set(report.skipped) == {k for k in r50.state_dict() if k.startswith("backbone.")}
    after = r101.state_dict()
    for k, v in r50.state_dict().items():
        if not k.startswith("backbone."):
            assert torch.equal(v, after[k]), k
    for k, v in backbone_before.items():
        assert torch.equal(v, after[k]), k


def test_imagenet_backbone_from_local_file(tmp_path):
    torch.manual_seed(5)
    resnet = torchvision.models.resnet18()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(tiny_config())
    report = load_pretrained(model, path)
    assert report.kind == "imagenet_backbone"
    assert {"fc.weight", "fc.bias"} <= set(report.skipped)
    assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in report.skipped)
    body = model.backbone[0].body.state_dict()
    for k, v in resnet.state_dict().items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(v, body[k]), k
    with pytest.raises(WeightsError, match="resnet50"):
        load_pretrained(build_model(tiny_config(backbone="resnet50")), path)


def test_pickled_object_is_refused(tmp_path):
    model = build_model(tiny_config())
    path = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(WeightsError, match="evil.pth.*weights_only"):
        load_pretrained(model, path)


def test_architecture_mismatch_is_an_error_naming_keys(tmp_path):
    path = tmp_path / "deep.pth"
    _save_reference(build_model(tiny_config(dec_layers=3)), path)
    with pytest.raises(WeightsError, match="decoder.layers.2"):
        load_pretrained(build_model(tiny_config(dec_layers=2)), path)
    path2 = tmp_path / "wide.pth"
    _save_reference(build_model(tiny_config(hidden_dim=64)), path2)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_pretrained(build_model(tiny_config(hidden_dim=32)), path2)
    with pytest.raises(WeightsError, match="no such file"):
        load_pretrained(build_model(tiny_config()), tmp_path / "missing.pth")


def test_published_weights_load_into_a_trainable_batchnorm_model(tmp_path):
    path = tmp_path / "frozen.pth"
    src = build_model(tiny_config())
    _save_reference(src, path)
    dst = build_model(tiny_config(frozen_bn=False))
    report = load_pretrained(dst, path)
    assert not report.skipped and not report.reinitialized
    bn = dst.backbone[0].body.bn1
    torch.testing.assert_close(bn.running_var, src.backbone[0].body.bn1.running_var)


def _published_layout(tmp_path, seed=1):
    """A tiny DETR with the published class head (num_classes=91: 92 logits indexed by COCO
    category id, no-object last), saved as the reference repository saves it."""
    torch.manual_seed(seed)
    src = build_model(tiny_config(num_classes=91))
    path = tmp_path / "detr-tiny-coco.pth"
    _save_reference(src, path)
    return src, path


def test_coco_category_table_is_torchvisions():
    names = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert COCO_CATEGORIES == {i: n for i, n in enumerate(names) if n not in ("__background__", "N/A")}
    assert len(COCO_CATEGORIES) == 80


def test_published_head_on_a_coco_subset_gives_the_reference_probabilities(tmp_path):
    # A dataset on disk (Parquet shards and _meta.json) whose categories are 3 of COCO's, ids and names.
    make_coco(tmp_path / "coco", categories=((18, "dog"), (1, "person"), (44, "bottle")))
    write_shards(
        load_coco(str(tmp_path / "coco" / "instances.json")),
        str(tmp_path / "coco" / "images"),
        str(tmp_path / "shards"),
        shard_size=4,
        workers=0,
        progress=False,
    )
    meta = read_meta(str(tmp_path / "shards"))
    src, path = _published_layout(tmp_path)
    torch.manual_seed(2)
    dst = build_model(tiny_config(num_classes=meta.num_classes))
    report = load_pretrained(dst, path, categories=list(zip(meta.label_to_category_id, meta.label_names)))

    ids = meta.label_to_category_id
    assert [(m.label, m.category_id, m.source_row) for m in report.mapped_by_id] == [
        (i, c, c) for i, c in enumerate(ids)
    ]
    assert not report.mapped_by_name and not report.new_classes and not report.reinitialized
    assert {"class_embed.weight", "class_embed.bias"} <= set(report.loaded) and not report.skipped
    assert "3 by id" in report.summary() and "0 new" in report.summary()
    rows = ids + [91]  # the dataset's categories, then no-object
    assert torch.equal(dst.class_embed.weight, src.class_embed.weight[rows])
    assert torch.equal(dst.class_embed.bias, src.class_embed.bias[rows])
    a, b = _outputs(src), _outputs(dst)
    # Logits: the reference model's, query by query and in every decoder layer (up to the float
    # rounding of a 4-column instead of a 92-column matrix product).
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"][..., rows], rtol=0, atol=1e-6)
    for aux_a, aux_b in zip(a["aux_outputs"], b["aux_outputs"]):
        torch.testing.assert_close(aux_b["pred_logits"], aux_a["pred_logits"][..., rows], rtol=0, atol=1e-6)
    assert torch.equal(b["pred_boxes"], a["pred_boxes"])
    # Probabilities: the reference's for these categories and no-object, renormalised over them.
    p_ref = a["pred_logits"].softmax(-1)[..., rows]
    torch.testing.assert_close(b["pred_logits"].softmax(-1), p_ref / p_ref.sum(-1, keepdim=True), rtol=0, atol=1e-6)


def test_published_head_maps_other_datasets_by_name(tmp_path):
    src, path = _published_layout(tmp_path)
    categories = [(1, "Dog"), (2, " traffic  Light "), (3, "widget"), (18, "cat")]
    dst = build_model(tiny_config(num_classes=len(categories)))
    torch.manual_seed(7)
    report = load_pretrained(dst, path, categories=categories)
    torch.manual_seed(7)
    fresh = nn.Linear(32, len(categories) + 1)  # DETR's class head as build_model initialises it

    # Id 1 is COCO's person and id 18 its dog: not these categories, so the ids are not trusted.
    assert [(m.label, m.source_row, m.source_name) for m in report.mapped_by_name] == [
        (0, 18, "dog"),
        (1, 10, "traffic light"),
        (3, 17, "cat"),
    ]
    assert [(m.label, m.name) for m in report.new_classes] == [(2, "widget")] and not report.mapped_by_id
    assert "3 by name" in report.summary() and "1 new (widget)" in report.summary()
    w, b = dst.class_embed.weight.detach(), dst.class_embed.bias.detach()
    sw, sb = src.class_embed.weight.detach(), src.class_embed.bias.detach()
    for label, row in ((0, 18), (1, 10), (3, 17), (-1, 91)):
        assert torch.equal(w[label], sw[row]) and torch.equal(b[label], sb[row]), label
    assert torch.equal(w[2], fresh.weight[2].detach()) and torch.equal(b[2], fresh.bias[2].detach())
    with pytest.raises(WeightsError, match="2 dataset categories given for a model with 4 classes"):
        load_pretrained(dst, path, categories=categories[:2])


def test_detr_ray_checkpoint_maps_by_its_stored_categories(tmp_path):
    torch.manual_seed(3)
    src = build_model(tiny_config(num_classes=3))
    stored = {"label_to_category_id": [7, 3, 5], "names": ["cat", "dog", "zebra"]}
    ckpt.save(tmp_path / "run", src, None, None, None, ckpt.TrainingState(4, 40, {}, categories=stored))
    # Another dataset: dog keeps its id, "Cat" has another id, horse is new, zebra is gone.
    categories = [(3, "dog"), (1, "Cat"), (9, "horse")]
    dst = build_model(tiny_config(num_classes=3))
    report = load_pretrained(dst, tmp_path / "run", categories=categories)
    assert [(m.label, m.source_row) for m in report.mapped_by_id] == [(0, 1)]
    assert [(m.label, m.source_row) for m in report.mapped_by_name] == [(1, 0)]
    assert [m.name for m in report.new_classes] == ["horse"]
    a, b = _outputs(src)["pred_logits"], _outputs(dst)["pred_logits"]
    torch.testing.assert_close(b[..., [0, 1, 3]], a[..., [1, 0, 3]], rtol=0, atol=1e-6)
    assert not torch.allclose(b[..., 2], a[..., 2])
    # Without the dataset's categories the checkpoint loads as it is (same shapes).
    plain = build_model(tiny_config(num_classes=3))
    assert not load_pretrained(plain, tmp_path / "run").classes
    assert torch.equal(_outputs(plain)["pred_logits"], a)
