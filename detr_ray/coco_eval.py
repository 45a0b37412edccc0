"""COCO bbox evaluation with pycocotools, reported under stable metric names.

`evaluate(gt, results)` runs COCOeval on a ground-truth COCO dict (or pycocotools COCO object)
and a list of COCO result dicts, and returns the 12 standard numbers as `val/AP`, `val/AP50`,
`val/AP75`, `val/APs`, `val/APm`, `val/APl`, `val/AR1`, `val/AR10`, `val/AR100`, `val/ARs`,
`val/ARm`, `val/ARl`, plus `val/mean_iou`: the mean IoU of the true positives at IoU 0.5
(all areas, 100 detections per image). As in pycocotools, -1 means "no ground truth in that
range". The numbers are exactly pycocotools' own on the same inputs.

Result sets pycocotools would crash on are checked first: an empty set scores 0, detections for
unknown images or categories and malformed entries are a clear error.

For the final evaluation report, `per_category(ev)` gives AP/AP50/AP75/AR100 and counts per
category and `ap_per_iou(ev)` the AP at each IoU threshold 0.50..0.95, both read from the same
COCOeval arrays that produced the 12 numbers. `write_results` / `load_results` store a result set
as the COCO results JSON that pycocotools' `COCO.loadRes` reads.

It sits at the package's top, below train/ and evaluation/, because validation during training
scores with it as the evaluation report does; the result dicts come from model/predict.py.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class ResultsError(ValueError):
    """A detection result set that cannot be evaluated against the ground truth."""


@dataclass
class Evaluation:
    metrics: dict[str, float]
    coco_eval: COCOeval | None  # None for an empty result set
    tp_ious: np.ndarray  # IoU of every true positive at IoU 0.5 (all areas, maxDet 100)
    gt: COCO | None = None  # the ground truth it was scored against


def _quiet(fn, *args):
    """pycocotools prints; keep its chatter in the debug log instead. (Ray workers replace
    builtins.print, so redirecting sys.stdout alone is not enough.)"""
    buf = io.StringIO()
    original = builtins.print

    def to_buffer(*args, sep=" ", end="\n", file=None, flush=False):
        buf.write(sep.join(str(a) for a in args) + end)

    builtins.print = to_buffer
    try:
        with contextlib.redirect_stdout(buf):
            out = fn(*args)
    finally:
        builtins.print = original
    if buf.getvalue().strip():
        log.debug("%s", buf.getvalue().strip())
    return out


def as_coco(gt: COCO | dict) -> COCO:
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    coco.dataset = gt
    _quiet(coco.createIndex)
    return coco


def check_results(gt: COCO, results: Sequence[dict], source: str = "results") -> None:
    """Raises ResultsError naming the first offending entry of each kind."""
    image_ids = set(gt.getImgIds())
    category_ids = set(gt.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ResultsError(f"{source}[{i}]: expected a dict, got {type(r).__name__}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
        if missing:
            raise ResultsError(f"{source}[{i}]: missing key(s) {missing}")
        box = r["bbox"]
        if not (
            isinstance(box, (list, tuple))
            and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        ):
            raise ResultsError(f"{source}[{i}].bbox: expected 4 finite numbers [x, y, w, h], got {box!r}")
        if not isinstance(r["score"], (int, float)) or not math.isfinite(r["score"]):
            raise ResultsError(f"{source}[{i}].score: expected a finite number, got {r['score']!r}")
        if r["image_id"] not in image_ids:
            raise ResultsError(f"{source}[{i}].image_id: {r['image_id']} is not an image of the ground truth")
        if r["category_id"] not in category_ids:
            raise ResultsError(
                f"{source}[{i}].category_id: {r['category_id']} is not a category of the ground truth "
                f"(known: {sorted(category_ids)[:10]}...); are labels mapped to the dataset's category ids?"
            )


def _tp_ious(E: COCOeval, gt: COCO, dt: COCO) -> np.ndarray:
    """IoU of every true positive at the first IoU threshold (0.5), area 'all', maxDet 100."""
    all_range = E.params.areaRng[0]
    max_det = E.params.maxDets[-1]
    ious = []
    for e in E.evalImgs:
        if e is None or e["aRng"] != all_range or e["maxDet"] != max_det:
            continue
        for d, dt_id in enumerate(e["dtIds"]):
            gt_id = int(e["dtMatches"][0, d])
            if gt_id and not e["dtIgnore"][0, d]:
                ious.append(_iou_xywh(dt.anns[dt_id]["bbox"], gt.anns[gt_id]["bbox"]))
    return np.asarray(ious, dtype=np.float64)


def _iou_xywh(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def evaluate(gt: COCO | dict, results: Sequence[dict], prefix: str = "val/", source: str = "results") -> Evaluation:
    gt = as_coco(gt)
    if not gt.getImgIds():
        raise ResultsError("ground truth has no images")
    results = list(results)
    check_results(gt, results, source)
    if not results:
        metrics = {prefix + name: 0.0 for name in METRIC_NAMES}
        metrics[prefix + "mean_iou"] = 0.0
        return Evaluation(metrics, None, np.zeros(0), gt)
    dt = _quiet(gt.loadRes, [dict(r) for r in results])  # loadRes adds keys: hand it copies
    E = COCOeval(gt, dt, iouType="bbox")
    _quiet(E.evaluate)
    _quiet(E.accumulate)
    _quiet(E.summarize)
    metrics = {prefix + name: float(v) for name, v in zip(METRIC_NAMES, E.stats)}
    tp = _tp_ious(E, gt, dt)
    metrics[prefix + "mean_iou"] = float(tp.mean()) if len(tp) else 0.0
    return Evaluation(metrics, E, tp, gt)


# --------------------------------------------------------------------------------------------
# Breakdowns of one evaluation (for the report)


def _mean_valid(values: np.ndarray) -> float:
    """pycocotools' summary rule: the mean over entries > -1, or -1 when there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def ap_per_iou(ev: Evaluation) -> dict[str, float]:
    """{"0.50": AP at IoU 0.50, ..., "0.95": ...} (all areas, 100 detections per image): the
    ten numbers whose mean is AP. An empty result set scores 0 at every threshold."""
    thresholds = np.linspace(0.5, 0.95, 10)
    if ev.coco_eval is None:
        return {f"{t:.2f}": 0.0 for t in thresholds}
    E = ev.coco_eval
    precision = E.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    return {f"{t:.2f}": _mean_valid(precision[i]) for i, t in enumerate(E.params.iouThrs)}


def per_category(ev: Evaluation) -> list[dict]:
    """One row per ground-truth category (ascending id): id, name, supercategory, AP, AP50,
    AP75, AR100 (all areas; -1: no ground truth of that category), ground-truth boxes
    (non-crowd) and detections. The mean of the AP column over rows with AP > -1 is AP."""
    gt = ev.gt
    rows = []
    cat_ids = sorted(gt.getCatIds())
    n_gt = Counter(a["category_id"] for a in gt.anns.values() if not a.get("iscrowd", 0))
    n_dt = Counter()
    if ev.coco_eval is not None:
        n_dt.update(a["category_id"] for a in ev.coco_eval.cocoDt.anns.values())
    for cid in cat_ids:
        cat = gt.cats[cid]
        row = {
            "id": cid,
            "name": cat.get("name", str(cid)),
            "supercategory": cat.get("supercategory", ""),
            "gt": n_gt[cid],
            "detections": n_dt[cid],
        }
        if ev.coco_eval is None:
            none = 0.0 if n_gt[cid] else -1.0
            row.update(AP=none, AP50=none, AP75=none, AR100=none)
        else:
            E = ev.coco_eval
            k_index = list(E.params.catIds).index(cid)
            precision = E.eval["precision"][:, :, k_index, 0, -1]  # [T, R]
            row["AP"] = _mean_valid(precision)
            row["AP50"] = _mean_valid(precision[0])
            row["AP75"] = _mean_valid(precision[5])
            row["AR100"] = _mean_valid(E.eval["recall"][:, k_index, 0, -1])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Result files


def write_results(path: str | Path, results: Sequence[dict]) -> Path:
    """Writes a COCO results JSON (a list of {image_id, category_id, bbox, score}). Floats are
    written with Python's shortest round-trip repr, so reading the file back gives the very
    numbers that were evaluated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(results)))
    tmp.replace(path)
    return path


def load_results(path: str | Path) -> list[dict]:
    """Reads a COCO results JSON; a file that is not a JSON list is a ResultsError naming it.
    (Entries are checked against the ground truth by `evaluate`.)"""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e}") from e
    except ValueError as e:
        raise ResultsError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ResultsError(f"{path}: expected a JSON list of detections, got {type(data).__name__}")
    return data
