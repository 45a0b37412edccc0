"""torchvision detectors behind model.arch, without Ray: each trains a step through the same
TrainStep, resumes from its checkpoint to the very same next step, and is scored by the project's
COCO evaluation with pycocotools' own numbers; COCO weights load with their class rows mapped."""

import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ray import checkpoint as ckpt
from detr_ray.coco_eval import METRIC_NAMES, evaluate
from detr_ray.config import ConfigError, experiment_from_dict
from detr_ray.model import WeightsError, detectors
from detr_ray.model.detectors import TorchvisionDetector
from detr_ray.model.predict import detections_to_results, normalize
from detr_ray.train.step import StepOptions, TrainStep, build_optimizer
from detr_ray.tune.space import parse_space
from tests.conftest import random_batch

ARCHS = ["fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"]
CATEGORY_IDS = [1, 2, 3]
NAMES = ["rectangle", "triangle", "ellipse"]


@pytest.fixture(autouse=True)
def one_thread():
    # ResNet-50 FPN convolutions on a shared 2-core machine: one thread each runs several times
    # faster than two threads fighting the other processes for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _experiment(arch):
    return experiment_from_dict({"model": {"arch": arch}, "train": {"lr": 1e-4, "lr_backbone": 1e-4}})


def _batch(seed):
    images, mask, targets = random_batch(batch=2, h=64, w=64, seed=seed)
    for i, (t, (h, w)) in enumerate(zip(targets, detectors.image_sizes(mask))):
        t.update(image_id=seed * 10 + i, size=torch.tensor([h, w]), orig_size=torch.tensor([2 * h, 2 * w]))
    return images, mask, targets


def _step(arch, model, optimizer, batch, seed):
    torch.manual_seed(seed)  # the samplers (RPN, ROI heads) draw from torch's generator
    return TrainStep(model, None, optimizer, StepOptions(clip_max_norm=0.1))(*batch)


def _ground_truth(batch):
    """COCO ground truth of the batch's boxes, in pixels of the original (2x) image."""
    _, _, targets = batch
    images, anns = [], []
    for t in targets:
        oh, ow = (int(v) for v in t["orig_size"])
        images.append({"id": t["image_id"], "height": oh, "width": ow, "file_name": f"{t['image_id']}.jpg"})
        for (cx, cy, w, h), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            box = [(cx - w / 2) * ow, (cy - h / 2) * oh, w * ow, h * oh]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": t["image_id"],
                    "category_id": CATEGORY_IDS[label],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(CATEGORY_IDS, NAMES)]
    return {"images": images, "annotations": anns, "categories": cats}


def _lighten(model):
    """Fewer RoIs for Faster R-CNN v2's four-conv box head (its defaults, 512 sampled RoIs per
    image in training and 1000 proposals in eval, cost a minute per step on a CPU)."""
    roi_heads = getattr(model.detector, "roi_heads", None)
    if roi_heads is not None:
        roi_heads.fg_bg_sampler.batch_size_per_image = 16
        model.detector.rpn._post_nms_top_n = {"training": 64, "testing": 64}


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_resumes_to_the_same_step_and_scores_as_pycocotools(arch, tmp_path):
    exp = _experiment(arch)
    cfg = exp.model.__class__(**{**exp.model.__dict__, "num_classes": 3})
    torch.manual_seed(0)
    model = detectors.build(cfg)
    assert isinstance(model, TorchvisionDetector)
    _lighten(model)
    optimizer = build_optimizer(model, exp.train.lr, exp.train.lr_backbone, 0.0)
    assert [g["name"] for g in optimizer.param_groups] == ["transformer", "backbone"]
    first = _step(arch, model, optimizer, _batch(1), seed=1)
    assert torch.isfinite(first["loss"]) and first["loss"] > 0
    parts = {k: v for k, v in first.items() if k.startswith("loss_")}
    assert len(parts) >= 2 and torch.allclose(sum(parts.values()), first["loss"])

    state = ckpt.TrainingState(
        epoch=1, global_step=1, config=exp.to_dict(), categories={"label_to_category_id": CATEGORY_IDS, "names": NAMES}
    )
    ckpt.save(tmp_path / "ck", model, optimizer, None, None, state)
    loaded = ckpt.load(tmp_path / "ck")
    assert loaded.state.config["model"]["arch"] == arch
    resumed_cfg = experiment_from_dict(loaded.state.config).model
    resumed = detectors.build(resumed_cfg.__class__(**{**resumed_cfg.__dict__, "num_classes": 3}))
    resumed.load_state_dict(loaded.model)
    _lighten(resumed)
    resumed_opt = build_optimizer(resumed, exp.train.lr, exp.train.lr_backbone, 0.0)
    resumed_opt.load_state_dict(loaded.optimizer)
    batch = _batch(2)
    going_on = _step(arch, model, optimizer, batch, seed=2)
    again = _step(arch, resumed, resumed_opt, batch, seed=2)
    assert torch.allclose(going_on["loss"], again["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)

    # Scoring: every detection torchvision keeps (no score floor, so an untrained head has some).
    inner = model.detector
    if hasattr(inner, "score_thresh"):
        inner.score_thresh = 0.0
    else:
        inner.roi_heads.score_thresh = 0.0
    model.eval()
    val = _batch(3)
    images, mask, targets = val
    dets = detectors.predict(model, normalize(images), mask, targets, CATEGORY_IDS)
    for d, t in zip(dets, targets):
        assert len(d["scores"]) > 0 and set(d["labels"].tolist()) <= set(CATEGORY_IDS)
        oh, ow = t["orig_size"].tolist()
        assert d["boxes"][:, 0::2].max() <= ow + 1e-3 and d["boxes"][:, 1::2].max() <= oh + 1e-3
    results = detections_to_results([t["image_id"] for t in targets], dets)
    gt = _ground_truth(val)
    ours = evaluate(gt, results, prefix="").metrics
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        E = COCOeval(coco, coco.loadRes(results), "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    assert [ours[n] for n in METRIC_NAMES] == pytest.approx(list(E.stats), abs=1e-12)


def _coco_file(arch, path):
    """A torchvision-layout state dict with COCO's 91 class rows, as torchvision publishes them."""
    torch.manual_seed(7)
    coco_model = detectors._builders()[arch](91)
    torch.save(coco_model.state_dict(), path)
    return coco_model.state_dict()


@pytest.mark.parametrize("arch,anchors", [("fasterrcnn_mobilenet_v3_large_fpn", 1), ("retinanet_resnet50_fpn_v2", 9)])
def test_coco_weights_load_with_class_rows_mapped_by_category(arch, anchors, tmp_path):
    coco = _coco_file(arch, tmp_path / "coco.pth")
    model = detectors.build(_experiment(arch).model.__class__(arch=arch, num_classes=3))
    categories = [(3, "car"), (99, "Person"), (5, "widget")]  # by id, by name, new
    report = detectors.load_weights(model, str(tmp_path / "coco.pth"), categories=categories)
    assert [m.how for m in report.classes] == ["id", "name", "new"]
    sd = model.detector.state_dict()
    offset = model.label_offset
    heads = detectors.CLASS_HEADS[model.family]
    for module, per_class in heads:
        for kind in ("weight", "bias"):
            ours = sd[f"{module}.{kind}"].reshape(anchors, 3 + offset, per_class, -1)
            theirs = coco[f"{module}.{kind}"].reshape(anchors, 91, per_class, -1)
            assert torch.equal(ours[:, 0 + offset], theirs[:, 3])  # car, by id
            assert torch.equal(ours[:, 1 + offset], theirs[:, 1])  # person, by name
            if kind == "weight":  # (RetinaNet's class biases all start at one prior)
                assert not any(torch.equal(ours[:, 2 + offset], theirs[:, r]) for r in range(91))  # new
            if offset:
                assert torch.equal(ours[:, 0], theirs[:, 0])  # background
    body = "backbone.body.layer2.0.conv1.weight" if "resnet" in arch else "backbone.body.1.block.0.0.weight"
    assert torch.equal(sd[body], coco[body])
    # Another architecture's weights are refused, naming what does not fit.
    with pytest.raises(WeightsError, match="not a state dict of fcos_resnet50_fpn"):
        detectors.load_weights(
            detectors.build(_experiment("fcos_resnet50_fpn").model.__class__(arch="fcos_resnet50_fpn", num_classes=3)),
            str(tmp_path / "coco.pth"),
            categories=categories,
        )


def test_every_configured_arch_has_a_torchvision_builder():
    from detr_ray.config import DETECTOR_ARCHS

    assert set(detectors._builders()) == set(DETECTOR_ARCHS)


def test_arch_is_validated_and_a_choice_in_a_search_space():
    with pytest.raises(ConfigError, match=r"config.model.arch: unknown architecture 'yolo'"):
        experiment_from_dict({"model": {"arch": "yolo"}})
    with pytest.raises(ConfigError, match="pretrained_backbone"):
        experiment_from_dict({"model": {"arch": "fcos_resnet50_fpn"}, "train": {"pretrained_backbone": "torchvision"}})
    space = parse_space({"experiment": {}, "search": {"model.arch": {"choice": ["detr", "fcos_resnet50_fpn"]}}}, "s")
    assert space.params[0].args == ["detr", "fcos_resnet50_fpn"]
    with pytest.raises(ConfigError, match="model.arch"):
        parse_space({"experiment": {}, "search": {"model.arch": {"choice": ["detr", "yolo"]}}}, "s")
    exp = experiment_from_dict({"model": {"arch": "retinanet_resnet50_fpn_v2"}})
    ignored = detectors.ignored_settings(exp)
    assert "model.num_queries" in ignored and "train.cost_giou" in ignored and "model.num_classes" not in ignored
    assert detectors.ignored_settings(experiment_from_dict({})) == []
