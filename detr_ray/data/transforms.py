"""DETR's augmentation recipe on torchvision.transforms.v2, with boxes as tv_tensors.BoundingBoxes
so that every flip, resize and crop moves the boxes with the pixels.

train (Carion et al., 2020):
    horizontal flip (p=flip_prob), then either
      - resize the shortest side to a random one of `train_scales` (longest side <= max_size), or
      - (p=crop_prob) resize the shortest side to one of `crop_resize_scales`, crop a random
        region whose sides lie in [crop_min, crop_max], then resize as in the first branch
        (ScaleCropScale: the same draws, one resampling of the original region),
    then drop boxes that became degenerate (SanitizeBoundingBoxes).
val: shortest side `val_scale`, longest side <= max_size.

`DetectionTransform(cfg, train)(image, boxes_xywh, labels)` takes a uint8 [3,H,W] image, pixel
[x, y, w, h] boxes and int64 labels, and returns the uint8 [3,h,w] augmented image (normalization
happens on the training device), boxes normalized (cx, cy, w, h) relative to the augmented
image's size, and the surviving labels.
"""

from __future__ import annotations

import PIL.Image
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detr_ray.data.recipe import TransformConfig

_XYXY = tv_tensors.BoundingBoxFormat.XYXY


class RandomSizeCrop:
    """Crops a random region whose height and width are drawn from [min_size, max_size]
    (capped by the image's own size). A v2-compatible callable on a sample dict; crops every
    image/box/mask entry (tensor or PIL image) and passes other entries (labels) through."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, sample: dict) -> dict:
        height, width = F.get_size(sample["image"])  # tensors and PIL images alike
        crop_w = _randint(min(self.min_size, width), min(self.max_size, width))
        crop_h = _randint(min(self.min_size, height), min(self.max_size, height))
        top = _randint(0, height - crop_h)
        left = _randint(0, width - crop_w)
        return {
            k: F.crop(v, top, left, crop_h, crop_w) if isinstance(v, (tv_tensors.TVTensor, PIL.Image.Image)) else v
            for k, v in sample.items()
        }


def _shortest_side_size(height: int, width: int, scales, max_size: int | None, generator=None) -> tuple[int, int]:
    """v2.RandomShortestSize's output size: a random one of `scales` for the shortest side,
    the longest side capped at `max_size`."""
    scale = scales[int(torch.randint(len(scales), (), generator=generator))]
    r = scale / min(height, width)
    if max_size is not None:
        r = min(r, max_size / max(height, width))
    return int(height * r), int(width * r)


class ScaleCropScale:
    """DETR's crop branch (shortest side to one of `crop_scales`, crop a random region with sides
    in [min_size, max_size], shortest side to one of `scales` with the longest <= `max_long`)
    with one resampling instead of two.

    Sizes and the crop are drawn exactly as the two-resize recipe draws them; the crop is then
    mapped back to the original image (rounded to whole source pixels) and that region is
    resized once to the final size. Cheaper (no intermediate full-image resize) and sharper (one
    interpolation), and boxes follow the pixels exactly. The crop is made channels-last dense
    before resizing, so that the resize takes its fast uint8 path and the output stays HWC in
    memory (see decode.py)."""

    def __init__(self, crop_scales, min_size: int, max_size: int, scales, max_long: int | None):
        self.crop_scales, self.min_size, self.max_size = list(crop_scales), min_size, max_size
        self.scales, self.max_long = list(scales), max_long

    def __call__(self, sample: dict) -> dict:
        height, width = F.get_size(sample["image"])
        (y0, x0, y1, x1), out_size = _plan_scale_crop(
            height, width, self.crop_scales, self.min_size, self.max_size, self.scales, self.max_long
        )

        def apply(value):
            if isinstance(value, tv_tensors.Image):
                region = _dense_hwc(F.crop(value, y0, x0, y1 - y0, x1 - x0).as_subclass(Tensor))
                return tv_tensors.wrap(F.resize(region, out_size, antialias=True), like=value)
            if isinstance(value, (tv_tensors.TVTensor, PIL.Image.Image)):
                return F.resize(F.crop(value, y0, x0, y1 - y0, x1 - x0), out_size, antialias=True)
            return value

        return {k: apply(v) for k, v in sample.items()}


def _plan_scale_crop(height, width, crop_scales, min_size, max_size, scales, max_long, generator=None):
    """ScaleCropScale's random draws: the source region (y0, x0, y1, x1) and the output size."""
    mid_h, mid_w = _shortest_side_size(height, width, crop_scales, None, generator)
    crop_w = _randint(min(min_size, mid_w), min(max_size, mid_w), generator)
    crop_h = _randint(min(min_size, mid_h), min(max_size, mid_h), generator)
    top = _randint(0, mid_h - crop_h, generator)
    left = _randint(0, mid_w - crop_w, generator)
    out_size = list(_shortest_side_size(crop_h, crop_w, scales, max_long, generator))
    sy, sx = height / mid_h, width / mid_w
    y0, x0 = min(round(top * sy), height - 1), min(round(left * sx), width - 1)
    y1, x1 = max(y0 + 1, min(round((top + crop_h) * sy), height)), max(x0 + 1, min(round((left + crop_w) * sx), width))
    return (y0, x0, y1, x1), out_size


def _dense_hwc(image: Tensor) -> Tensor:
    """The same [..., 3, H, W] image, its memory made dense channels-last (HWC), so that the uint8
    resize takes its fast path and its output stays HWC (see collate.py)."""
    return image.movedim(-3, -1).contiguous().movedim(-1, -3)


def _randint(low: int, high: int, generator=None) -> int:
    """Uniform integer in [low, high] from `generator` (None: torch's global one, as
    torchvision's own transforms draw)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def _drop_degenerate() -> list:
    """Clamp first: a resize can leave an edge box a float epsilon outside the canvas, and
    SanitizeBoundingBoxes drops boxes that reach outside it."""
    return [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]


def build_train_transform(cfg: TransformConfig) -> v2.Compose:
    resize = v2.RandomShortestSize(list(cfg.train_scales), max_size=cfg.max_size)
    if cfg.crop_prob > 0:
        crop = ScaleCropScale(cfg.crop_resize_scales, cfg.crop_min, cfg.crop_max, cfg.train_scales, cfg.max_size)
        scale = v2.RandomChoice([resize, crop], p=[1.0 - cfg.crop_prob, cfg.crop_prob])
    else:
        scale = resize
    return v2.Compose([v2.RandomHorizontalFlip(cfg.flip_prob), scale, *_drop_degenerate()])


def build_val_transform(cfg: TransformConfig) -> v2.Compose:
    return v2.Compose([v2.Resize(cfg.val_scale, max_size=cfg.max_size), *_drop_degenerate()])


def normalized_cxcywh(boxes_xyxy: Tensor, height: int, width: int) -> Tensor:
    """Pixel (x0, y0, x1, y1) -> (cx, cy, w, h) as fractions of the image size."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return box_convert(boxes_xyxy.float(), "xyxy", "cxcywh") / scale


class DetectionTransform:
    """The train or val recipe for one image (see the module docstring for in/out).

    Calls transforms.v2's kernels (resize_image, resize_bounding_boxes, crop_..., horizontal_flip_...,
    clamp_ and sanitize_bounding_boxes) directly, drawing the same random numbers in the same
    order as the `build_train_transform` / `build_val_transform` pipelines, so its output equals
    theirs exactly (tests/data/test_transforms.py). It skips their per-call dispatch (sample
    flattening, tv_tensor wrapping): 1.9 -> 1.1 ms per COCO-sized image (one thread), a fifth of a
    decode task's time. `generator`: where the draws come from (None: torch's global generator)."""

    def __init__(self, cfg: TransformConfig, train: bool):
        self.cfg = cfg.validate()
        self.train = train
        self._branch_p = torch.tensor([1.0 - cfg.crop_prob, cfg.crop_prob])  # as v2.RandomChoice's p

    def __call__(
        self, image: Tensor, boxes_xywh: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        size = tuple(image.shape[-2:])
        boxes = box_convert(boxes_xywh.reshape(-1, 4).float(), "xywh", "xyxy")
        if not self.train:
            image = F.resize_image(image, [cfg.val_scale], max_size=cfg.max_size, antialias=True)
            boxes, size = F.resize_bounding_boxes(boxes, size, [cfg.val_scale], max_size=cfg.max_size)
        else:
            if torch.rand(1, generator=generator) < cfg.flip_prob:  # v2.RandomHorizontalFlip's draw
                image = F.horizontal_flip_image(image)
                boxes = F.horizontal_flip_bounding_boxes(boxes, _XYXY, size)
            if (
                cfg.crop_prob > 0 and int(torch.multinomial(self._branch_p, 1, generator=generator)) == 1
            ):  # v2.RandomChoice's
                (y0, x0, y1, x1), out_size = _plan_scale_crop(
                    *size, cfg.crop_resize_scales, cfg.crop_min, cfg.crop_max, cfg.train_scales, cfg.max_size, generator
                )
                image = F.resize_image(
                    _dense_hwc(F.crop_image(image, y0, x0, y1 - y0, x1 - x0)), out_size, antialias=True
                )
                boxes, size = F.crop_bounding_boxes(boxes, _XYXY, y0, x0, y1 - y0, x1 - x0)
            else:
                out_size = list(
                    _shortest_side_size(*size, cfg.train_scales, cfg.max_size, generator)
                )  # v2.RandomShortestSize
                image = F.resize_image(image, out_size, antialias=True)
            boxes, size = F.resize_bounding_boxes(boxes, size, out_size)
        boxes = F.clamp_bounding_boxes(boxes, _XYXY, size, clamping_mode="soft")  # as _drop_degenerate()
        boxes, keep = F.sanitize_bounding_boxes(boxes, _XYXY, size, min_size=1.0)
        return image, normalized_cxcywh(boxes, *image.shape[-2:]), labels.reshape(-1)[keep]
