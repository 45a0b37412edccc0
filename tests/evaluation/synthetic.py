"""Synthetic COCO ground truth and result sets with every kind of error (no model, no Ray)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

CATEGORIES = [
    {"id": 1, "name": "cat", "supercategory": "animal"},
    {"id": 2, "name": "dog", "supercategory": "animal"},
    {"id": 5, "name": "car", "supercategory": "vehicle"},
    {"id": 9, "name": "bus", "supercategory": "vehicle"},
]
IDS = [c["id"] for c in CATEGORIES]


def random_dataset(
    n_images: int = 40, seed: int = 0, crowd: bool = True, ties: bool = False
) -> tuple[dict, list[dict]]:
    """Images of 200x150 with 0-4 boxes (some crowd); per box 0-2 detections (right class 70%,
    jittered by 2, 8 or 20 px) plus random background detections. `ties`: scores on a coarse grid."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []

    def score(x):
        return float(np.round(x * 4) / 4) if ties else float(x)

    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 200, "height": 150, "file_name": f"{i:04d}.jpg"})
        for _ in range(rng.integers(0, 5)):
            w, h = rng.uniform(10, 80, 2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 150 - h)
            c = int(rng.choice(IDS))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd and rng.uniform() < 0.08),
                }
            )
            for _ in range(rng.integers(0, 3)):
                cc = c if rng.uniform() < 0.7 else int(rng.choice(IDS))
                j = rng.normal(0, rng.choice([2, 8, 20]), 4)
                results.append(
                    {
                        "image_id": i,
                        "category_id": cc,
                        "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)],
                        "score": score(rng.uniform(0.2, 1.0)),
                    }
                )
        for _ in range(rng.integers(0, 12)):
            w, h = rng.uniform(5, 60, 2)
            results.append(
                {
                    "image_id": i,
                    "category_id": int(rng.choice(IDS)),
                    "bbox": [float(rng.uniform(0, 150)), float(rng.uniform(0, 100)), w, h],
                    "score": score(rng.uniform(0, 0.6)),
                }
            )
    return {"images": images, "annotations": anns, "categories": CATEGORIES}, results


def coco_eval(gt: dict, results: list[dict], iou_thrs=None) -> COCOeval:
    """pycocotools run directly (its own loading path, on copies)."""
    import copy

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        E = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        if iou_thrs is not None:
            E.params.iouThrs = np.asarray(iou_thrs, dtype=float)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E


def coco_ap50(gt: dict, results: list[dict]) -> float:
    if not results:
        return 0.0
    return float(coco_eval(gt, results).stats[1])


def coco_matches(E: COCOeval, t_index: int = 0) -> tuple[set[int], set[int], set[int]]:
    """(matched detection ids, unmatched non-ignored detection ids, matched gt ids) at one IoU
    threshold, area "all", maxDet 100. Detection ids are result index + 1 (loadRes' numbering)."""
    tp, fp, gt = set(), set(), set()
    for e in E.evalImgs:
        if e is None or e["aRng"] != E.params.areaRng[0] or e["maxDet"] != E.params.maxDets[-1]:
            continue
        for d, dt_id in enumerate(e["dtIds"]):
            if e["dtIgnore"][t_index, d]:
                continue
            (tp if e["dtMatches"][t_index, d] else fp).add(int(dt_id))
        for g, gt_id in enumerate(e["gtIds"]):
            if e["gtMatches"][t_index, g] and not e["gtIgnore"][g]:
                gt.add(int(gt_id))
    return tp, fp, gt


def box(x, y, w=40.0, h=40.0):
    return [float(x), float(y), float(w), float(h)]


def error_zoo() -> tuple[dict, list[dict], dict[int, str], dict[int, str]]:
    """One detection of each TIDE type and one box of each status, on two images.
    Returns (gt, results, expected type per result index, expected status per ann id)."""
    images = [
        {"id": 1, "width": 400, "height": 300, "file_name": "a.jpg"},
        {"id": 2, "width": 400, "height": 300, "file_name": "b.jpg"},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": box(10, 10)},  # A cat: found
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": box(200, 10)},  # B dog: labelled cat -> covered
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": box(10, 150)},  # C cat: badly localized -> covered
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": box(300, 200)},  # D car: missed
        {"id": 5, "image_id": 2, "category_id": 9, "bbox": box(100, 100)},  # E bus: found
        {"id": 6, "image_id": 2, "category_id": 5, "bbox": box(250, 100)},  # F car: missed (only a "both" near it)
        {"id": 7, "image_id": 2, "category_id": 5, "bbox": box(20, 200)},  # G car: found
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": box(300, 100)},  # H cat: found late
    ]
    for a in anns:
        a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
    results = [
        {"image_id": 1, "category_id": 1, "bbox": box(11, 11), "score": 0.95},  # tp on A
        {"image_id": 1, "category_id": 1, "bbox": box(13, 12), "score": 0.90},  # duplicate of A
        {"image_id": 1, "category_id": 1, "bbox": box(202, 12), "score": 0.85},  # classification (on B)
        {"image_id": 1, "category_id": 1, "bbox": box(30, 165), "score": 0.80},  # localization (C, IoU ~0.3)
        {"image_id": 1, "category_id": 1, "bbox": box(120, 220, 20, 20), "score": 0.70},  # background
        {"image_id": 2, "category_id": 9, "bbox": box(100, 100), "score": 0.75},  # tp on E
        {"image_id": 2, "category_id": 9, "bbox": box(270, 115), "score": 0.78},  # both (bus on car F, IoU ~0.2)
        {"image_id": 2, "category_id": 5, "bbox": box(20, 20), "score": 0.50},  # background
        {"image_id": 1, "category_id": 9, "bbox": box(300, 10, 30, 30), "score": 0.40},  # background
        {"image_id": 2, "category_id": 5, "bbox": box(22, 198), "score": 0.30},  # tp on G
        {"image_id": 1, "category_id": 1, "bbox": box(301, 99), "score": 0.10},  # tp on H, after every cat error
    ]
    types = {
        0: "tp",
        1: "duplicate",
        2: "classification",
        3: "localization",
        4: "background",
        5: "tp",
        6: "both",
        7: "background",
        8: "background",
        9: "tp",
        10: "tp",
    }
    status = {
        1: "matched",
        2: "covered",
        3: "covered",
        4: "missed",
        5: "matched",
        6: "missed",
        7: "matched",
        8: "matched",
    }
    return {"images": images, "annotations": anns, "categories": CATEGORIES}, results, types, status
