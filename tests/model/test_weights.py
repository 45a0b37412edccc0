import argparse
import logging

import pytest
import torch
import torchvision

from detr_ray.model import WeightsError, build_model, load_pretrained
from detr_ray.train.step import normalize
from tests.conftest import random_batch, tiny_config


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
    _save_reference(src, path, optimizer=opt.state_dict(), epoch=3, args=argparse.Namespace(lr=1e-4, backbone="resnet18"))
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
