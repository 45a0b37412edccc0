"""Boxes follow pixels: after every transform each box equals the pixel extent of its rectangle."""

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from detr_ray.config import ConfigError
from detr_ray.data.transforms import (
    DetectionTransform,
    RandomSizeCrop,
    ScaleCropScale,
    TransformConfig,
    build_train_transform,
    build_val_transform,
)
from tests.data.conftest import COLOURS, rectangles_image

BOXES = [[10, 12, 40, 30], [70, 8, 25, 60], [20, 70, 60, 22], [110, 50, 30, 30]]  # x, y, w, h in 120x160


def sample():
    image = rectangles_image(120, 160, BOXES)
    boxes = tv_tensors.BoundingBoxes(
        box_convert(torch.tensor(BOXES, dtype=torch.float32), "xywh", "xyxy"), format="XYXY", canvas_size=(120, 160)
    )
    return {"image": tv_tensors.Image(image), "boxes": boxes, "labels": torch.arange(len(BOXES))}


def pixel_box(image: torch.Tensor, colour) -> torch.Tensor | None:
    """xyxy extent of the pixels closest to `colour` (None if there are none)."""
    on = torch.tensor(colour)[:, None, None] > 127  # the colour's channels, thresholded at half
    hit = ((image > 127) == on).all(0) & (image > 127).any(0)
    if not hit.any():
        return None
    ys, xs = torch.nonzero(hit, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def assert_boxes_follow_pixels(out, atol: float = 1.0):
    image, boxes, labels = out["image"], out["boxes"], out["labels"]
    assert image.dtype == torch.uint8
    assert boxes.canvas_size == tuple(image.shape[-2:])
    for box, label in zip(boxes, labels):
        if (box[2:] - box[:2]).min() < 3:  # a sliver left by a crop is blurred away by resizing
            continue
        expected = pixel_box(image, COLOURS[int(label)])
        assert expected is not None, f"box {box.tolist()} kept but rectangle {int(label)} has no pixels"
        assert torch.allclose(box.float(), expected, atol=atol), (int(label), box.tolist(), expected.tolist())
    for label in set(range(len(BOXES))) - set(labels.tolist()):  # dropped boxes: nothing (or a sliver) left
        extent = pixel_box(image, COLOURS[label])
        assert extent is None or (extent[2:] - extent[:2]).min() <= 2


SMALL = TransformConfig(
    train_scales=(96, 128, 160), max_size=220, crop_resize_scales=(100, 140), crop_min=64, crop_max=96, val_scale=100
)
# The crop branch (ScaleCropScale) crops whole source pixels and resamples once, so it is held
# to 1 px like the rest (the literal resize -> crop -> resize could only be held to 1 px times
# the second resize's magnification).


@pytest.mark.parametrize(
    "name, transform, atol",
    [
        ("flip", v2.RandomHorizontalFlip(p=1.0), 1.0),
        ("shortest_side", v2.RandomShortestSize([90, 150], max_size=180), 1.0),
        ("max_size_caps", v2.RandomShortestSize([300], max_size=240), 1.0),
        ("crop", RandomSizeCrop(40, 90), 1.0),
        ("val", build_val_transform(SMALL), 1.0),
        ("train_no_crop", build_train_transform(TransformConfig(**{**SMALL.__dict__, "crop_prob": 0.0})), 1.0),
        ("train", build_train_transform(SMALL), 1.0),
        ("train_crop_always", build_train_transform(TransformConfig(**{**SMALL.__dict__, "crop_prob": 1.0})), 1.0),
    ],
)
def test_boxes_follow_pixels(name, transform, atol):
    torch.manual_seed(0)
    for _ in range(25):
        out = v2.SanitizeBoundingBoxes()(transform(sample()))  # a no-op where nothing degenerated
        assert_boxes_follow_pixels(out, atol)


def test_one_resample_crop_draws_as_the_two_resize_recipe():
    """Same seed, same draws: the output sizes equal those of resize -> crop -> resize, and the
    pixels differ only by interpolation."""
    reference = v2.Compose(
        [v2.RandomShortestSize([100, 140]), RandomSizeCrop(64, 96), v2.RandomShortestSize([96, 128, 160], max_size=220)]
    )
    merged = ScaleCropScale([100, 140], 64, 96, [96, 128, 160], 220)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference(sample())
        torch.manual_seed(seed)
        out = merged(sample())
        assert out["image"].shape == expected["image"].shape, seed
        assert (out["image"].float() - expected["image"].float()).abs().mean() < 12, seed
        assert out["image"].permute(1, 2, 0).is_contiguous()  # HWC in memory, as decoded


def test_boxes_touching_the_border_survive_resizing():
    """A resize can put a border box's edge a float epsilon outside the canvas; it must be
    clamped, not dropped (SanitizeBoundingBoxes alone drops it)."""
    kept = 0
    for height, width, scale in [(40, 51, 98), (40, 73, 62), (40, 73, 89), (40, 84, 56), (47, 62, 71)]:
        image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
        box = [width / 3, height / 3, float(width), float(height)]
        boxes = tv_tensors.BoundingBoxes(torch.tensor([box]), format="XYXY", canvas_size=(height, width))
        out = build_val_transform(TransformConfig(val_scale=scale, max_size=1000))(
            {"image": image, "boxes": boxes, "labels": torch.tensor([0])}
        )
        assert out["labels"].tolist() == [0], (height, width, scale)
        h, w = out["image"].shape[-2:]
        assert out["boxes"][0, 2:].tolist() == [float(w), float(h)]
        kept += 1
    assert kept == 5


def test_crop_drops_boxes_it_cuts_away():
    torch.manual_seed(1)
    seen_dropped = False
    for _ in range(20):
        out = v2.SanitizeBoundingBoxes()(RandomSizeCrop(40, 60)(sample()))
        assert out["image"].shape[-2] <= 60 and out["image"].shape[-1] <= 60
        assert len(out["boxes"]) == len(out["labels"])
        seen_dropped |= len(out["labels"]) < len(BOXES)
        assert_boxes_follow_pixels(out)
    assert seen_dropped


def test_detection_transform_output_contract():
    image = rectangles_image(120, 160, BOXES)
    labels = torch.tensor([5, 6, 7, 8])
    val = DetectionTransform(SMALL, train=False)
    out_image, boxes, out_labels = val(image, torch.tensor(BOXES, dtype=torch.float32), labels)
    assert out_image.dtype == torch.uint8 and out_image.shape == (3, 100, 133)
    assert torch.equal(out_labels, labels)
    # normalized (cx, cy, w, h) is invariant to a pure resize
    expected = box_convert(torch.tensor(BOXES, dtype=torch.float32), "xywh", "cxcywh") / torch.tensor(
        [160, 120, 160, 120]
    )
    assert torch.allclose(boxes, expected, atol=1e-5)

    train = DetectionTransform(SMALL, train=True)
    torch.manual_seed(0)
    for _ in range(10):
        out_image, boxes, out_labels = train(image, torch.tensor(BOXES, dtype=torch.float32), labels)
        assert boxes.dtype == torch.float32 and boxes.shape == (len(out_labels), 4)
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert min(out_image.shape[-2:]) in SMALL.train_scales or max(out_image.shape[-2:]) <= SMALL.max_size

    empty = val(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert empty[1].shape == (0, 4) and empty[2].shape == (0,)


def test_coco_defaults_are_detrs_recipe():
    cfg = TransformConfig.coco()
    assert cfg.train_scales == tuple(range(480, 801, 32)) and cfg.max_size == 1333
    assert cfg.crop_resize_scales == (400, 500, 600) and (cfg.crop_min, cfg.crop_max) == (384, 600)
    assert cfg.val_scale == 800 and cfg.flip_prob == 0.5 and cfg.crop_prob == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_scales": []}, "augment.train_scales"),
        ({"crop_min": 700}, "crop_min 700 > crop_max 600"),
        ({"flip_prob": 1.5}, "augment.flip_prob"),
    ],
)
def test_invalid_config_is_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TransformConfig(**overrides).validate()


@pytest.mark.parametrize("name", ["val", "train", "train_crop_always", "train_no_crop_no_flip"])
def test_detection_transform_equals_the_v2_pipeline(name):
    """DetectionTransform calls v2's kernels directly; with the same seed it must give exactly what
    the v2.Compose recipe gives (same random draws in the same order): pixels, boxes, labels."""
    cfg = {
        "val": SMALL,
        "train": SMALL,
        "train_crop_always": TransformConfig(**{**SMALL.__dict__, "crop_prob": 1.0}),
        "train_no_crop_no_flip": TransformConfig(**{**SMALL.__dict__, "crop_prob": 0.0, "flip_prob": 0.0}),
    }[name]
    train = name != "val"
    direct = DetectionTransform(cfg, train=train)
    pipeline = build_train_transform(cfg) if train else build_val_transform(cfg)
    shapes = set()
    for seed in range(30):
        height, width = (120, 160) if seed % 2 else (160, 120)
        boxes = [[x, y, w, h] for x, y, w, h in BOXES if x + w <= width and y + h <= height] + [[0, 0, 3, 2]]
        # the pixels' memory is HWC, as the JPEG decoder leaves it
        image = rectangles_image(height, width, BOXES).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        xywh = torch.tensor(boxes, dtype=torch.float32)
        labels = torch.arange(len(boxes))
        torch.manual_seed(seed)
        got_image, got_boxes, got_labels = direct(image, xywh, labels)
        torch.manual_seed(seed)
        ref = pipeline(
            {
                "image": tv_tensors.Image(image),
                "boxes": tv_tensors.BoundingBoxes(
                    box_convert(xywh, "xywh", "xyxy"), format="XYXY", canvas_size=(height, width)
                ),
                "labels": labels,
            }
        )
        ref_image = ref["image"].as_subclass(torch.Tensor)
        assert torch.equal(got_image, ref_image), seed
        assert got_image.stride() == ref_image.stride(), seed
        h, w = ref_image.shape[-2:]
        ref_boxes = box_convert(ref["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh") / torch.tensor([w, h, w, h])
        assert torch.allclose(got_boxes, ref_boxes, atol=1e-6), seed
        assert torch.equal(got_labels, ref["labels"]), seed
        shapes.add(tuple(got_image.shape))
    assert len(shapes) > (1 if name == "val" else 3)  # the draws varied
