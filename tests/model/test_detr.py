import pytest
import torch

from detr_ray.config import ConfigError
from detr_ray.model import DETRConfig, build_model
from detr_ray.model.predict import normalize
from tests.conftest import random_batch, tiny_config


@pytest.mark.parametrize(
    "backbone,dilation,stride,stages",
    [
        ("resnet18", False, 32, 4),
        ("resnet34", False, 32, 4),
        ("resnet50", False, 32, 4),
        ("resnet50", True, 16, 4),
        ("resnet101", False, 32, 4),
        ("resnet18", False, 16, 3),
        ("resnet50", False, 16, 3),
    ],
)
def test_shapes_and_masks_for_every_backbone(backbone, dilation, stride, stages):
    cfg = tiny_config(backbone=backbone, dilation=dilation, num_classes=5, backbone_stages=stages)
    model = build_model(cfg).eval()
    images, mask, _ = random_batch(batch=2, h=96, w=128)
    with torch.no_grad():
        features, small_mask, pos = model.backbone(normalize(images), mask)
        out = model(normalize(images), mask)
    assert features.shape == (2, model.backbone.num_channels, 96 // stride, 128 // stride)
    assert small_mask.shape == (2, 96 // stride, 128 // stride) and small_mask.dtype == torch.bool
    assert not small_mask[0].any() and small_mask[1].any() and not small_mask[1].all()
    assert pos.shape == (2, cfg.hidden_dim, 96 // stride, 128 // stride)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert all(a["pred_logits"].shape == out["pred_logits"].shape for a in out["aux_outputs"])


def test_paper_defaults_and_reference_parameter_count():
    cfg = DETRConfig()
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers) == (256, 8, 6, 6)
    assert (cfg.dim_feedforward, cfg.dropout, cfg.num_queries, cfg.aux_loss) == (2048, 0.1, 100, True)
    model = build_model(cfg)
    # The reference implementation reports 41,302,368 trainable parameters for DETR-R50 on COCO.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 41_302_368
    assert model.class_embed.out_features == 92
    keys = model.state_dict().keys()
    for k in (
        "backbone.0.body.layer1.0.conv1.weight",
        "backbone.0.body.bn1.running_var",
        "transformer.encoder.layers.0.self_attn.in_proj_weight",
        "transformer.decoder.layers.5.multihead_attn.out_proj.weight",
        "transformer.decoder.norm.weight",
        "class_embed.weight",
        "bbox_embed.layers.2.weight",
        "query_embed.weight",
        "input_proj.weight",
    ):
        assert k in keys
    assert "transformer.encoder.norm.weight" not in keys  # post-norm: no final encoder norm
    assert not any(k.startswith("backbone.0.body.fc") for k in keys)


def test_pre_norm_adds_encoder_norm():
    model = build_model(tiny_config(pre_norm=True))
    assert "transformer.encoder.norm.weight" in model.state_dict()
    images, mask, _ = random_batch()
    out = model(normalize(images), mask)
    assert torch.isfinite(out["pred_logits"]).all()


def test_aux_loss_off():
    model = build_model(tiny_config(aux_loss=False)).eval()
    images, mask, _ = random_batch()
    assert "aux_outputs" not in model(normalize(images), mask)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"backbone": "vgg16"}, "backbone"),
        ({"backbone": "resnet18", "dilation": True}, "dilation"),
        ({"hidden_dim": 30, "nheads": 4}, "hidden_dim"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        build_model(tiny_config(**overrides))


def test_frozen_batchnorm_calibration_keeps_a_random_resnet101_finite():
    from detr_ray.model.backbone import calibrate_frozen_batchnorm

    torch.manual_seed(0)
    model = build_model(tiny_config(backbone="resnet101"))
    images, mask, _ = random_batch(batch=2, h=96, w=128)
    x = normalize(images)
    with torch.no_grad():
        raw = model.backbone[0].body(x)["0"]
        n = calibrate_frozen_batchnorm(model.backbone, x)
        calibrated = model.backbone[0].body(x)["0"]
    assert n == 104  # bn1 + 3 per bottleneck (33 blocks) + 4 downsample
    assert raw.abs().max() > 1e4  # identity statistics: activations explode through 101 layers
    assert calibrated.abs().max() < 1e3 and torch.isfinite(calibrated).all()
    assert not any(p.requires_grad for n_, p in model.backbone.named_parameters() if "bn" in n_)


def test_trainable_batchnorm_backbone_for_training_from_scratch():
    model = build_model(tiny_config(frozen_bn=False)).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 20  # resnet18: bn1 + 2 per block (8) + 3 downsample
    assert all(p.requires_grad for p in model.backbone.parameters())
    images, mask, _ = random_batch()
    before = bns[0].running_mean.clone()
    model(normalize(images), mask)
    assert not torch.equal(before, bns[0].running_mean)  # statistics are learned in train mode


def test_three_stage_backbone_has_no_layer4():
    model = build_model(tiny_config(backbone="resnet18", backbone_stages=3))
    assert model.backbone.num_channels == 256
    assert not any(".layer4." in k for k in model.state_dict())
    full = build_model(tiny_config(backbone="resnet18"))
    assert sum(p.numel() for p in model.parameters()) < 0.4 * sum(p.numel() for p in full.parameters())
    with pytest.raises(ConfigError, match="model.backbone_stages: must be 3 or 4"):
        DETRConfig(backbone_stages=2).validate()
    with pytest.raises(ConfigError, match="model.dilation: DC5 dilates layer4"):
        DETRConfig(backbone_stages=3, dilation=True).validate()
