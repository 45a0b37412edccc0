"""What a detector gets wrong, and what each kind of mistake costs: error analysis of a COCO bbox
result set against its ground truth.

- `match`: COCO's greedy matching of detections to ground truth, per image and category
  (highest score first, each detection takes the unmatched box it overlaps most at IoU >= t;
  crowd boxes swallow the detections that fall on them; 100 detections per image and
  category), re-implemented so that every detection and box gets a status. Its true and false
  positives are exactly COCOeval's at the same IoU (area "all", maxDet 100).
- `tide`: the error taxonomy of TIDE (Bolya et al., "TIDE: A General Toolbox for Identifying
  Object Detection Errors", ECCV 2020), at foreground IoU 0.5 and background IoU 0.1. Every
  false positive at IoU 0.5 gets exactly one type, decided by the ground-truth box it overlaps
  most (ties: the box of its own class):
      duplicate       IoU >= 0.5 with a box of its class that a higher-scoring detection took
      classification  IoU >= 0.5 with a box of another class
      localization    0.1 <= IoU < 0.5 with a box of its class
      both            0.1 <= IoU < 0.5 with a box of another class
      background      IoU < 0.1 with every box
  (a reading of the paper's IoU_max definitions; crowd boxes take no part), and every ground-truth
  box is exactly one of: matched (a true positive), covered (the target of a classification or
  localization error: fixing that error finds it), or missed.
  Each type's dAP is AP50 after fixing only that type minus AP50 as it is, with this module's
  own AP (COCO's 101-point interpolation; its base value equals COCOeval's AP50). Fixes, as in
  the paper: classification -> the detection takes the right class, localization -> the right
  box (either becomes a true positive of its target box, or is dropped when that box is already
  found); both, duplicate, background -> the detection is dropped; missed -> those boxes leave
  the ground truth. A category whose boxes all leave scores 1 if no detection of it remains,
  else 0.
- `coco_breakdown`: the COCO "analyze" breakdown as PR curves, on pycocotools COCOeval with
  changed parameters and ground truth: C75 and C50 (PR at IoU .75, .5), Loc (IoU .1:
  localization errors forgiven, duplicates not), Sim (IoU .1, and detections falling on a box of
  another class of the same supercategory are ignored), Oth (the same for every other class),
  BG (every remaining false positive removed: precision 1 up to the recall reached), FN (1).
- `pr_curves`: overall PR curves per IoU threshold, and those of the worst categories.
- `tp_iou_stats`: the distribution of the true positives' IoU.
- `worst_images`: the images with the most false positives / negatives among detections above a
  score threshold, with their boxes (for drawing).

`analyze(evaluation, results)` runs all of them.

The module is long because its analyses stand on the same private pieces (the ground-truth
index, `match`, the IoU of a detection with the boxes of its image, COCO's 101-point AP) and
are read as one account of a detector's errors, which report.py draws.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ray.coco_eval import Evaluation, _quiet, as_coco

log = logging.getLogger(__name__)

FG_IOU = 0.5
BG_IOU = 0.1
MAX_DETS = 100
REC_THRS = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds
FP_TYPES = ("classification", "localization", "both", "duplicate", "background")
ERROR_TYPES = (*FP_TYPES, "missed")
STAGES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")

# Detection status in a Matching.
TP, FP, IGNORED, DROPPED = 1, 0, -1, -2


# --------------------------------------------------------------------------------------------
# Ground truth, indexed by image


@dataclass
class _ImageGT:
    ann_ids: np.ndarray  # int64 [G]
    cats: np.ndarray  # int64 [G]
    boxes: np.ndarray  # float64 [G, 4] xywh
    crowd: np.ndarray  # bool [G]


class GroundTruth:
    """A COCO ground truth as arrays per image, in ascending image id (COCOeval's order)."""

    def __init__(self, gt: COCO | dict):
        self.coco = as_coco(gt)
        self.image_ids = sorted(self.coco.getImgIds())
        self.image_order = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.cat_ids = sorted(self.coco.getCatIds())
        self.images: dict[int, _ImageGT] = {}
        for image_id in self.image_ids:
            anns = self.coco.imgToAnns.get(image_id, [])
            self.images[image_id] = _ImageGT(
                np.array([a["id"] for a in anns], dtype=np.int64),
                np.array([a["category_id"] for a in anns], dtype=np.int64),
                np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
                np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            )
        self.ann_category = {a["id"]: a["category_id"] for a in self.coco.anns.values()}
        self.positives = Counter(a["category_id"] for a in self.coco.anns.values() if not a.get("iscrowd", 0))

    def supercategory(self, cat_id: int) -> str:
        return self.coco.cats[cat_id].get("supercategory") or ""


def _iou(dt_boxes: np.ndarray, gt_boxes: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """[D, G] IoU as COCOeval computes it (pycocotools.mask.iou; crowd boxes: intersection over
    the detection's area)."""
    if len(dt_boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros((len(dt_boxes), len(gt_boxes)))
    return np.asarray(mask_utils.iou(dt_boxes, gt_boxes, crowd.astype(np.uint8).tolist()), dtype=np.float64)


def _by_image(results: Sequence[dict]) -> dict[int, np.ndarray]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        groups[r["image_id"]].append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}


# --------------------------------------------------------------------------------------------
# Matching


@dataclass
class Matching:
    """Per result index: status (TP, FP, IGNORED: fell on a crowd box, DROPPED: beyond the
    100 best of its image and category), the ann id it matched (0: none), and its rank among
    its image and category's detections (COCO's order). Per non-crowd box: who found it."""

    iou_threshold: float
    status: np.ndarray
    matched_gt: np.ndarray
    rank: np.ndarray
    gt_matched_by: dict[int, int] = field(default_factory=dict)  # ann id -> result index


def match(
    gt: GroundTruth, results: Sequence[dict], iou_threshold: float = FG_IOU, max_dets: int = MAX_DETS
) -> Matching:
    n = len(results)
    status = np.full(n, DROPPED, dtype=np.int8)
    matched_gt = np.zeros(n, dtype=np.int64)
    rank = np.zeros(n, dtype=np.int64)
    gt_matched_by: dict[int, int] = {}
    threshold = min(iou_threshold, 1 - 1e-10)  # as COCOeval
    for image_id, det_idx in _by_image(results).items():
        g = gt.images[image_id]
        boxes = np.array([results[i]["bbox"] for i in det_idx], dtype=np.float64).reshape(-1, 4)
        cats = np.array([results[i]["category_id"] for i in det_idx], dtype=np.int64)
        scores = np.array([results[i]["score"] for i in det_idx], dtype=np.float64)
        ious = _iou(boxes, g.boxes, g.crowd)
        for c in np.unique(cats):
            d_sel = np.nonzero(cats == c)[0]
            order = d_sel[np.argsort(-scores[d_sel], kind="mergesort")]
            rank[det_idx[order]] = np.arange(len(order))
            g_sel = np.nonzero(g.cats == c)[0]
            g_sel = g_sel[np.argsort(g.crowd[g_sel], kind="mergesort")]  # crowd boxes last
            taken = np.zeros(len(g_sel), dtype=bool)
            for d in order[:max_dets]:
                best, best_iou = -1, threshold
                for j, gi in enumerate(g_sel):
                    crowd = g.crowd[gi]
                    if taken[j] and not crowd:
                        continue
                    if best > -1 and not g.crowd[g_sel[best]] and crowd:
                        break  # found an ordinary box: crowd boxes come after, and lose
                    if ious[d, gi] < best_iou:
                        continue
                    best, best_iou = j, ious[d, gi]
                r = det_idx[d]
                if best == -1:
                    status[r] = FP
                    continue
                gi = g_sel[best]
                matched_gt[r] = g.ann_ids[gi]
                if g.crowd[gi]:
                    status[r] = IGNORED
                else:
                    status[r] = TP
                    taken[best] = True
                    gt_matched_by[int(g.ann_ids[gi])] = int(r)
    return Matching(iou_threshold, status, matched_gt, rank, gt_matched_by)


# --------------------------------------------------------------------------------------------
# AP (COCO's 101-point interpolation), for TIDE's fixes


def _category_precision(scores, is_tp, image_order, rank, npos: int) -> np.ndarray:
    """Interpolated precision at the 101 recall thresholds, as COCOeval.accumulate computes it
    (same ordering of equal scores, same arithmetic)."""
    if npos == 0:
        return np.full(len(REC_THRS), 0.0 if len(scores) else 1.0)
    order = np.lexsort((rank, image_order, -scores))
    tp = is_tp[order]
    tp_sum = np.cumsum(tp).astype(float)
    fp_sum = np.cumsum(~tp).astype(float)
    recall = tp_sum / npos
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    inds = np.searchsorted(recall, REC_THRS, side="left")
    valid = inds < len(precision)
    q = np.zeros(len(REC_THRS))
    q[valid] = precision[inds[valid]]
    return q


@dataclass
class _Scored:
    """The evaluated (TP or FP) detections at IoU 0.5, as arrays, and the categories scored."""

    index: np.ndarray  # result index
    cat: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    image_order: np.ndarray
    rank: np.ndarray
    categories: list[int]  # categories with ground truth (COCOeval's K with npig > 0)
    positives: dict[int, int]

    def mean_ap(self, cat=None, tp=None, keep=None, positives=None) -> float:
        cat = self.cat if cat is None else cat
        tp = self.tp if tp is None else tp
        keep = np.ones(len(cat), dtype=bool) if keep is None else keep
        positives = self.positives if positives is None else positives
        if not self.categories:
            return -1.0
        qs = []
        for c in self.categories:
            sel = keep & (cat == c)
            qs.append(
                _category_precision(self.score[sel], tp[sel], self.image_order[sel], self.rank[sel], positives[c])
            )
        return float(np.mean(np.stack(qs, axis=1)))  # [R, K], as pycocotools' summarize


# --------------------------------------------------------------------------------------------
# TIDE


@dataclass
class Tide:
    base_ap50: float
    errors: dict[str, dict]  # type -> {"count": n, "dAP": float}
    false_positives_dap: float  # every false-positive type fixed at once
    false_negatives_dap: float  # missed boxes fixed (the same as errors["missed"]["dAP"])
    detection_type: np.ndarray  # per result index: "tp", "ignored", "dropped" or a FP type
    gt_status: dict[int, str]  # non-crowd ann id -> "matched", "covered" or "missed"

    def to_json(self) -> dict:
        return {
            "fg_iou": FG_IOU,
            "bg_iou": BG_IOU,
            "base_AP50": self.base_ap50,
            "errors": self.errors,
            "false_positives_dAP": self.false_positives_dap,
            "false_negatives_dAP": self.false_negatives_dap,
            "detections": dict(Counter(self.detection_type.tolist())),
            "ground_truth": dict(Counter(self.gt_status.values())),
        }


def _classify_false_positive(same: np.ndarray, other: np.ndarray) -> tuple[str, int, bool]:
    """(type, index of the target box, whether the target is of the detection's class) from the
    detection's IoU with the boxes of its own class (`same`) and of the others (`other`)."""
    best_same = same.max() if same.size else -1.0
    best_other = other.max() if other.size else -1.0
    if best_same >= best_other:
        iou, j, own = best_same, int(same.argmax()) if same.size else -1, True
    else:
        iou, j, own = best_other, int(other.argmax()), False
    if iou >= FG_IOU:
        return ("duplicate" if own else "classification"), j, own
    if iou >= BG_IOU:
        return ("localization" if own else "both"), j, own
    return "background", -1, own


def tide(gt: GroundTruth, results: Sequence[dict], matching: Matching | None = None) -> Tide:
    matching = matching or match(gt, results, FG_IOU)
    n = len(results)
    kind = np.full(n, "", dtype=object)
    kind[matching.status == TP] = "tp"
    kind[matching.status == IGNORED] = "ignored"
    kind[matching.status == DROPPED] = "dropped"
    target = np.zeros(n, dtype=np.int64)  # ann id a classification/localization error aims at

    for image_id, det_idx in _by_image(results).items():
        fps = det_idx[matching.status[det_idx] == FP]
        if not len(fps):
            continue
        g = gt.images[image_id]
        real = ~g.crowd
        ann_ids, cats = g.ann_ids[real], g.cats[real]
        boxes = np.array([results[i]["bbox"] for i in fps], dtype=np.float64).reshape(-1, 4)
        ious = _iou(boxes, g.boxes[real], np.zeros(int(real.sum()), dtype=bool))
        for row, r in enumerate(fps):
            own = cats == results[r]["category_id"]
            t, j, is_own = _classify_false_positive(ious[row, own], ious[row, ~own])
            kind[r] = t
            if t in ("classification", "localization"):
                target[r] = (ann_ids[own] if is_own else ann_ids[~own])[j]

    gt_status = {}
    covered = set(target[(kind == "classification") | (kind == "localization")].tolist())
    for ann_id, cat in gt.ann_category.items():
        if gt.coco.anns[ann_id].get("iscrowd", 0):
            continue
        if ann_id in matching.gt_matched_by:
            gt_status[ann_id] = "matched"
        else:
            gt_status[ann_id] = "covered" if ann_id in covered else "missed"

    scored_idx = np.nonzero((matching.status == TP) | (matching.status == FP))[0]
    scored = _Scored(
        index=scored_idx,
        cat=np.array([results[i]["category_id"] for i in scored_idx], dtype=np.int64),
        score=np.array([results[i]["score"] for i in scored_idx], dtype=np.float64),
        tp=matching.status[scored_idx] == TP,
        image_order=np.array([gt.image_order[results[i]["image_id"]] for i in scored_idx], dtype=np.int64),
        rank=matching.rank[scored_idx],
        categories=[c for c in gt.cat_ids if gt.positives[c] > 0],
        positives={c: gt.positives[c] for c in gt.cat_ids},
    )
    base = scored.mean_ap()
    missed_per_cat = Counter(gt.ann_category[a] for a, s in gt_status.items() if s == "missed")
    found = set(matching.gt_matched_by)
    errors = {}
    for t in FP_TYPES:
        errors[t] = {"count": int((kind == t).sum()), "dAP": _fixed_ap(scored, kind, target, gt, found, {t}) - base}
    fixed_positives = {c: scored.positives[c] - missed_per_cat[c] for c in scored.positives}
    missed_dap = scored.mean_ap(positives=fixed_positives) - base
    errors["missed"] = {"count": sum(missed_per_cat.values()), "dAP": missed_dap}
    fp_dap = _fixed_ap(scored, kind, target, gt, found, set(FP_TYPES)) - base
    return Tide(base, errors, fp_dap, missed_dap, kind, gt_status)


def _fixed_ap(
    scored: _Scored, kind: np.ndarray, target: np.ndarray, gt: GroundTruth, found: set[int], types: set[str]
) -> float:
    """AP50 after fixing the false positives of `types` (see the module docstring); `found`:
    the boxes true positives already took."""
    cat, tp = scored.cat.copy(), scored.tp.copy()
    keep = np.ones(len(cat), dtype=bool)
    found = set(found)
    for pos in np.lexsort((scored.rank, scored.image_order, -scored.score)):
        t = kind[scored.index[pos]]
        if t not in types:
            continue
        goal = int(target[scored.index[pos]])
        if t in ("classification", "localization") and goal not in found:
            found.add(goal)
            tp[pos] = True
            cat[pos] = gt.ann_category[goal]
        else:
            keep[pos] = False
    return scored.mean_ap(cat=cat, tp=tp, keep=keep)


# --------------------------------------------------------------------------------------------
# COCO analyze() breakdown


class _AnalyzeEval(COCOeval):
    """COCOeval that also ignores ground truth marked `analysis_ignore` (with ordinary IoU,
    unlike crowd boxes): detections falling on such a box are neither true nor false."""

    def _prepare(self):
        super()._prepare()
        for anns in self._gts.values():
            for g in anns:
                if g.get("analysis_ignore"):
                    g["ignore"] = 1


def _coco_eval(gt_dataset: dict, results: Sequence[dict], iou_thrs: Sequence[float]) -> COCOeval:
    gt = as_coco(gt_dataset)
    dt = _quiet(gt.loadRes, [dict(r) for r in results])
    E = _AnalyzeEval(gt, dt, iouType="bbox")
    E.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    E.params.maxDets = [MAX_DETS]
    E.params.areaRng = [[0.0, 1e10]]
    E.params.areaRngLbl = ["all"]
    _quiet(E.evaluate)
    _quiet(E.accumulate)
    return E


def _with_confusions_ignored(gt: GroundTruth, results: Sequence[dict], same_supercategory: bool) -> dict:
    """The ground truth plus, for each category c, copies relabelled c and marked
    `analysis_ignore` of the boxes of other categories (only those of c's supercategory when
    `same_supercategory`). Only copies that a detection of c overlaps at IoU >= 0.1 (the IoU the
    breakdown is computed at) are made: the others could not change any match."""
    dataset = copy.deepcopy(gt.coco.dataset)
    next_id = max((a["id"] for a in dataset["annotations"]), default=0) + 1
    for image_id, det_idx in _by_image(results).items():
        g = gt.images[image_id]
        if not len(g.ann_ids):
            continue
        boxes = np.array([results[i]["bbox"] for i in det_idx], dtype=np.float64).reshape(-1, 4)
        cats = np.array([results[i]["category_id"] for i in det_idx], dtype=np.int64)
        ious = _iou(boxes, g.boxes, g.crowd)
        anns = {a["id"]: a for a in gt.coco.imgToAnns[image_id]}
        for c in np.unique(cats):
            near = ious[cats == c].max(axis=0) >= BG_IOU
            sc = gt.supercategory(int(c))
            for j in np.nonzero(near & (g.cats != c))[0]:
                if same_supercategory and (not sc or gt.supercategory(int(g.cats[j])) != sc):
                    continue
                a = anns[int(g.ann_ids[j])]
                dataset["annotations"].append(
                    {
                        "id": next_id,
                        "image_id": image_id,
                        "category_id": int(c),
                        "bbox": list(a["bbox"]),
                        "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
                        "iscrowd": a.get("iscrowd", 0),
                        "analysis_ignore": 1,
                    }
                )
                next_id += 1
    return dataset


@dataclass
class Breakdown:
    """AP of each stage C75 .. FN (overall: the mean over categories with ground truth) with
    its PR curve at REC_THRS, and per category."""

    ap: dict[str, float]
    curves: dict[str, np.ndarray]  # stage -> [101]
    per_category: dict[int, dict[str, float]]  # cat id -> stage -> AP

    def to_json(self) -> dict:
        return {
            "stages": list(STAGES),
            "AP": self.ap,
            "per_category": {str(k): v for k, v in self.per_category.items()},
        }


def coco_breakdown(gt: GroundTruth, results: Sequence[dict]) -> Breakdown:
    cats = gt.cat_ids
    if not results:
        zero = {s: (1.0 if s == "FN" else 0.0) for s in STAGES}
        with_gt = [c for c in cats if gt.positives[c] > 0]
        return Breakdown(zero, {s: np.full(len(REC_THRS), zero[s]) for s in STAGES}, {c: dict(zero) for c in with_gt})
    base = _coco_eval(gt.coco.dataset, results, [0.75, 0.5, 0.1])
    sim = _coco_eval(_with_confusions_ignored(gt, results, True), results, [0.1])
    oth = _coco_eval(_with_confusions_ignored(gt, results, False), results, [0.1])
    curves_k: dict[str, np.ndarray] = {}  # stage -> [R, K]
    p_base = base.eval["precision"][:, :, :, 0, 0]
    curves_k["C75"], curves_k["C50"], curves_k["Loc"] = p_base[0], p_base[1], p_base[2]
    curves_k["Sim"] = sim.eval["precision"][0, :, :, 0, 0]
    curves_k["Oth"] = oth.eval["precision"][0, :, :, 0, 0]
    reached = oth.eval["recall"][0, :, 0, 0]  # [K]
    valid = p_base[1].min(axis=0) > -1  # categories with ground truth
    curves_k["BG"] = np.where(valid[None, :], (REC_THRS[:, None] <= reached[None, :]).astype(float), -1.0)
    curves_k["FN"] = np.where(valid[None, :], 1.0, -1.0) * np.ones((len(REC_THRS), len(cats)))
    ap, curves, per_category = {}, {}, {}
    for s in STAGES:
        ck = curves_k[s][:, valid]
        curves[s] = ck.mean(axis=1) if ck.size else np.zeros(len(REC_THRS))
        ap[s] = float(ck.mean()) if ck.size else -1.0
    for k, c in enumerate(cats):
        if valid[k]:
            per_category[c] = {s: float(curves_k[s][:, k].mean()) for s in STAGES}
    return Breakdown(ap, curves, per_category)


# --------------------------------------------------------------------------------------------
# PR curves and IoU statistics from the main evaluation


@dataclass
class PRCurves:
    iou_thrs: list[float]
    overall: np.ndarray  # [T, 101]: mean precision over categories at each IoU threshold
    worst: list[dict]  # the lowest-AP categories: id, name, AP, "curve50", "curve75" ([101])

    def to_json(self) -> dict:
        return {
            "recall_thresholds": REC_THRS.tolist(),
            "iou_thresholds": self.iou_thrs,
            "overall": {f"{t:.2f}": self.overall[i].tolist() for i, t in enumerate(self.iou_thrs)},
            "worst_categories": [
                {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in w.items()} for w in self.worst
            ],
        }


def pr_curves(ev: Evaluation, worst: int = 6) -> PRCurves:
    iou_thrs = [round(float(t), 2) for t in np.linspace(0.5, 0.95, 10)]
    if ev.coco_eval is None:
        return PRCurves(iou_thrs, np.zeros((10, len(REC_THRS))), [])
    E = ev.coco_eval
    precision = E.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    overall = np.zeros((len(iou_thrs), len(REC_THRS)))
    for t in range(len(iou_thrs)):
        valid = precision[t].min(axis=0) > -1
        if valid.any():
            overall[t] = precision[t][:, valid].mean(axis=1)
    cats = []
    for k, cid in enumerate(E.params.catIds):
        p = precision[:, :, k]
        if p.min() > -1:
            cats.append(
                {
                    "id": int(cid),
                    "name": ev.gt.cats[cid].get("name", str(cid)),
                    "AP": float(p.mean()),
                    "curve50": p[0],
                    "curve75": p[5],
                }
            )
    cats.sort(key=lambda c: (c["AP"], c["id"]))
    return PRCurves(iou_thrs, overall, cats[:worst])


@dataclass
class IoUStats:
    ious: np.ndarray
    edges: np.ndarray

    def to_json(self) -> dict:
        counts, _ = np.histogram(self.ious, bins=self.edges)
        out = {
            "count": int(len(self.ious)),
            "histogram": {"edges": self.edges.round(4).tolist(), "counts": counts.tolist()},
        }
        if len(self.ious):
            q = np.quantile(self.ious, [0.1, 0.25, 0.5, 0.75, 0.9])
            out.update(
                mean=float(self.ious.mean()),
                quantiles=dict(zip(("p10", "p25", "median", "p75", "p90"), q.round(6).tolist())),
            )
        return out


def tp_iou_stats(ev: Evaluation) -> IoUStats:
    """True positives at IoU 0.5 (all areas, 100 detections): the IoU with their box."""
    return IoUStats(np.asarray(ev.tp_ious, dtype=np.float64), np.linspace(0.5, 1.0, 11))


# --------------------------------------------------------------------------------------------
# Worst images


@dataclass
class WorstImages:
    score_threshold: float
    false_positives: list[dict]  # images, most false positives first
    false_negatives: list[dict]

    def to_json(self) -> dict:
        return {
            "score_threshold": self.score_threshold,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
        }


def worst_images(gt: GroundTruth, results: Sequence[dict], score_threshold: float = 0.5, k: int = 6) -> WorstImages:
    """Among detections with score >= `score_threshold` (what a user would see), matched at IoU
    0.5: the `k` images with the most false positives and the `k` with the most missed boxes.
    Each entry holds the image's detections (with tp) and ground truth (with matched)."""
    shown = [r for r in results if r["score"] >= score_threshold]
    m = match(gt, shown, FG_IOU)
    by_image = _by_image(shown)
    entries = []
    for image_id in gt.image_ids:
        idx = by_image.get(image_id, np.zeros(0, dtype=np.int64))
        idx = idx[m.status[idx] != DROPPED]
        dets = [
            {
                "bbox": [float(v) for v in shown[i]["bbox"]],
                "category_id": int(shown[i]["category_id"]),
                "score": float(shown[i]["score"]),
                "tp": bool(m.status[i] == TP),
            }
            for i in idx
        ]
        g = gt.images[image_id]
        boxes = [
            {
                "bbox": g.boxes[j].tolist(),
                "category_id": int(g.cats[j]),
                "crowd": bool(g.crowd[j]),
                "matched": int(g.ann_ids[j]) in m.gt_matched_by,
            }
            for j in range(len(g.ann_ids))
        ]
        fp = [d for d, i in zip(dets, idx) if m.status[i] == FP]
        fn = [b for b in boxes if not b["matched"] and not b["crowd"]]
        info = gt.coco.imgs[image_id]
        entries.append(
            {
                "image_id": int(image_id),
                "file_name": info.get("file_name", ""),
                "width": info.get("width"),
                "height": info.get("height"),
                "false_positives": len(fp),
                "false_negatives": len(fn),
                "fp_score": sum(d["score"] for d in fp),
                "detections": dets,
                "ground_truth": boxes,
            }
        )
    most_fp = sorted(
        (e for e in entries if e["false_positives"]),
        key=lambda e: (-e["false_positives"], -e["fp_score"], e["image_id"]),
    )
    most_fn = sorted((e for e in entries if e["false_negatives"]), key=lambda e: (-e["false_negatives"], e["image_id"]))
    return WorstImages(score_threshold, most_fp[:k], most_fn[:k])


# --------------------------------------------------------------------------------------------
# All of it


@dataclass
class Analysis:
    tide: Tide
    breakdown: Breakdown
    pr: PRCurves
    tp_iou: IoUStats
    worst: WorstImages

    def to_json(self) -> dict:
        return {
            "tide": self.tide.to_json(),
            "coco_breakdown": self.breakdown.to_json(),
            "pr_curves": self.pr.to_json(),
            "tp_iou": self.tp_iou.to_json(),
            "worst_images": self.worst.to_json(),
        }


def analyze(ev: Evaluation, results: Sequence[dict], *, score_threshold: float = 0.5, worst_k: int = 6) -> Analysis:
    """Every analysis of this module for a result set already scored by coco_eval.evaluate
    (which has checked it against the ground truth)."""
    gt = GroundTruth(ev.gt)
    results = list(results)
    log.info("analysing %d detections on %d images", len(results), len(gt.image_ids))
    return Analysis(
        tide=tide(gt, results),
        breakdown=coco_breakdown(gt, results),
        pr=pr_curves(ev, worst_k),
        tp_iou=tp_iou_stats(ev),
        worst=worst_images(gt, results, score_threshold, worst_k),
    )
