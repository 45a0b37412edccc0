import copy

import numpy as np
import pytest

from detr_ray.coco_eval import evaluate
from detr_ray.evaluation import analysis as A
from tests.evaluation.synthetic import coco_ap50, coco_eval, coco_matches, error_zoo, random_dataset


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True)])
def test_matching_is_cocoevals_at_each_threshold(seed, ties):
    gt, results = random_dataset(seed=seed, ties=ties)
    E = coco_eval(gt, results)  # iouThrs .50:.95
    index = A.GroundTruth(gt)
    for t_index, t in ((0, 0.5), (5, 0.75)):
        m = A.match(index, results, t)
        tp, fp, found = coco_matches(E, t_index)
        assert {i + 1 for i in np.nonzero(m.status == A.TP)[0]} == tp
        assert {i + 1 for i in np.nonzero(m.status == A.FP)[0]} == fp
        assert set(m.gt_matched_by) == found
    assert (m.status == A.IGNORED).any()  # the crowd boxes are exercised


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_tide_base_ap_is_cocoevals_ap50(seed, ties):
    gt, results = random_dataset(seed=seed, ties=ties)
    t = A.tide(A.GroundTruth(gt), results)
    assert t.base_ap50 == coco_ap50(gt, results)  # exactly: same matching, same interpolation


def test_every_false_positive_has_one_type_and_every_box_one_status():
    gt, results = random_dataset(seed=3, n_images=60)
    E = coco_eval(gt, results)
    tp, fp, found = coco_matches(E, 0)
    t = A.tide(A.GroundTruth(gt), results)
    kinds = t.detection_type
    fp_idx = {i + 1 for i, k in enumerate(kinds) if k in A.FP_TYPES}
    assert fp_idx == fp  # each of COCOeval's false positives, and only those, has an error type
    assert {i + 1 for i, k in enumerate(kinds) if k == "tp"} == tp
    assert sum(t.errors[k]["count"] for k in A.FP_TYPES) == len(fp)
    assert all(t.errors[k]["count"] > 0 for k in A.ERROR_TYPES)  # the data exercises every type
    real = {a["id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert set(t.gt_status) == real
    assert {a for a, s in t.gt_status.items() if s == "matched"} == found
    unmatched = real - found
    assert {a for a, s in t.gt_status.items() if s in ("covered", "missed")} == unmatched
    assert t.errors["missed"]["count"] == sum(1 for s in t.gt_status.values() if s == "missed")
    for k in A.ERROR_TYPES:
        assert t.errors[k]["dAP"] >= -1e-12  # fixing an error never lowers AP here
    assert t.false_positives_dap >= max(t.errors[k]["dAP"] for k in A.FP_TYPES) - 1e-12


def _fixed_by_hand(gt, results, types, kind):
    """The result set (and ground truth) with one error type fixed as the paper says, for
    pycocotools to score."""
    gt, results = copy.deepcopy(gt), copy.deepcopy(results)
    boxes = {a["id"]: a for a in gt["annotations"]}
    if kind == "missed":
        gt["annotations"] = [a for a in gt["annotations"] if a["id"] not in (4, 6)]
        return gt, results
    keep = []
    for i, r in enumerate(results):
        if types[i] != kind:
            keep.append(r)
        elif kind == "classification":
            keep.append({**r, "category_id": boxes[2]["category_id"]})
        elif kind == "localization":
            keep.append({**r, "bbox": list(boxes[3]["bbox"])})
    return gt, keep


def test_error_zoo_types_and_daps_equal_pycocotools_on_the_fixed_sets():
    gt, results, types, status = error_zoo()
    t = A.tide(A.GroundTruth(gt), results)
    assert {i: k for i, k in enumerate(t.detection_type)} == types
    assert t.gt_status == status
    base = coco_ap50(gt, results)
    assert t.base_ap50 == pytest.approx(base, abs=1e-12)
    for kind in A.ERROR_TYPES:
        fixed_gt, fixed = _fixed_by_hand(gt, results, types, kind)
        expected = coco_ap50(fixed_gt, fixed) - base
        assert t.errors[kind]["dAP"] == pytest.approx(expected, abs=1e-12), kind
        assert t.errors[kind]["dAP"] > 0, kind  # each error costs AP in this set
    all_fp = [r for i, r in enumerate(results) if types[i] == "tp"] + [
        {**results[2], "category_id": 2},
        {**results[3], "bbox": list(gt["annotations"][2]["bbox"])},
    ]
    assert t.false_positives_dap == pytest.approx(coco_ap50(gt, all_fp) - base, abs=1e-12)


def test_fix_of_an_already_found_target_drops_the_detection():
    gt, results, types, _ = error_zoo()
    # A second, lower-scoring "cat" on dog B: after the first is fixed, B is found; this one is dropped.
    results.append({"image_id": 1, "category_id": 1, "bbox": [201.0, 11.0, 40.0, 40.0], "score": 0.2})
    t = A.tide(A.GroundTruth(gt), results)
    assert t.detection_type[-1] == "classification" and t.errors["classification"]["count"] == 2
    fixed = [r for i, r in enumerate(results[:-1]) if types[i] != "classification"] + [{**results[2], "category_id": 2}]
    assert t.errors["classification"]["dAP"] == pytest.approx(coco_ap50(gt, fixed) - coco_ap50(gt, results), abs=1e-12)


def test_coco_breakdown_stages():
    gt, results = random_dataset(seed=4, n_images=60)
    index = A.GroundTruth(gt)
    b = A.coco_breakdown(index, results)
    E = coco_eval(gt, results)
    assert b.ap["C50"] == pytest.approx(E.stats[1], abs=1e-12)
    assert b.ap["C75"] == pytest.approx(E.stats[2], abs=1e-12)
    loc = coco_eval(gt, results, iou_thrs=[0.1])
    assert b.ap["Loc"] == pytest.approx(float(loc.eval["precision"][0, :, :, 0, -1].mean()), abs=1e-12)
    values = [b.ap[s] for s in A.STAGES]
    assert values == sorted(values) and b.ap["FN"] == 1.0
    for s in A.STAGES:  # pointwise too: forgiving errors never lowers precision
        assert b.curves[s].shape == (101,)
    for lower, upper in zip(A.STAGES[2:], A.STAGES[3:]):
        assert (b.curves[upper] >= b.curves[lower] - 1e-12).all(), (lower, upper)
    assert set(b.per_category) == {1, 2, 5, 9}


def test_supercategory_and_other_confusions():
    gt, results, _, _ = error_zoo()
    # Bus detections: on cat A (another supercategory; added, scored highest), on car F (same
    # supercategory, IoU ~0.2), then the true positive on bus E.
    results = results + [{"image_id": 1, "category_id": 9, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.99}]
    b = A.coco_breakdown(A.GroundTruth(gt), results)
    cat, bus = b.per_category[1], b.per_category[9]
    assert cat["Sim"] > cat["Loc"]  # the zoo's cat on dog B is forgiven within "animal"
    assert (
        bus["Loc"] == pytest.approx(1 / 3) and bus["Sim"] == pytest.approx(1 / 2) and bus["Oth"] == pytest.approx(1.0)
    )


def test_empty_result_set():
    gt, _ = random_dataset(seed=5, n_images=10)
    ev = evaluate(gt, [])
    an = A.analyze(ev, [])
    assert an.tide.base_ap50 == 0.0
    assert all(an.tide.errors[k]["count"] == 0 for k in A.FP_TYPES)
    n_real = sum(1 for a in gt["annotations"] if not a["iscrowd"])
    assert an.tide.errors["missed"]["count"] == n_real
    assert an.tide.errors["missed"]["dAP"] == 1.0  # nothing left to find, nothing wrong
    assert an.breakdown.ap["C50"] == 0.0 and an.breakdown.ap["FN"] == 1.0
    assert an.worst.false_positives == [] and an.worst.false_negatives
    assert an.to_json()["tp_iou"]["count"] == 0


def test_pr_curves_iou_stats_and_worst_images():
    gt, results = random_dataset(seed=6, n_images=30)
    ev = evaluate(gt, results)
    an = A.analyze(ev, results, score_threshold=0.5, worst_k=3)
    assert an.pr.overall.shape == (10, 101)
    assert an.pr.overall[0].mean() == pytest.approx(ev.metrics["val/AP50"], abs=1e-12)
    assert an.pr.overall.mean() == pytest.approx(ev.metrics["val/AP"], abs=1e-12)
    assert [c["AP"] for c in an.pr.worst] == sorted(c["AP"] for c in an.pr.worst) and len(an.pr.worst) == 3
    iou = an.tp_iou.to_json()
    assert sum(iou["histogram"]["counts"]) == iou["count"] == len(ev.tp_ious)
    assert iou["mean"] == pytest.approx(ev.metrics["val/mean_iou"])
    fps = an.worst.false_positives
    assert [e["false_positives"] for e in fps] == sorted((e["false_positives"] for e in fps), reverse=True)
    for e in fps + an.worst.false_negatives:
        assert all(d["score"] >= 0.5 for d in e["detections"])
        assert e["false_positives"] == sum(not d["tp"] for d in e["detections"])
        assert e["false_negatives"] == sum(not g["matched"] and not g["crowd"] for g in e["ground_truth"])
    # The first image has the most false positives among detections >= 0.5 of all images.
    shown = [r for r in results if r["score"] >= 0.5]
    m = A.match(A.GroundTruth(gt), shown)
    per_image = {}
    for r, s in zip(shown, m.status):
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + int(s == A.FP)
    assert fps[0]["false_positives"] == max(per_image.values())


def test_breakdown_copies_only_what_can_matter():
    """Sim/Oth copy only the boxes a detection of the category overlaps at IoU >= 0.1; copying
    every box of every other category gives the same curves."""
    gt, results = random_dataset(seed=10, n_images=30)
    index = A.GroundTruth(gt)
    for same_super, stage in ((True, "Sim"), (False, "Oth")):
        everything = copy.deepcopy(gt)
        next_id = 10_000
        for image_id in {r["image_id"] for r in results}:
            for c in sorted({r["category_id"] for r in results if r["image_id"] == image_id}):
                for a in gt["annotations"]:
                    if a["image_id"] != image_id or a["category_id"] == c:
                        continue
                    if same_super and index.supercategory(c) != index.supercategory(a["category_id"]):
                        continue
                    everything["annotations"].append({**a, "id": next_id, "category_id": c, "analysis_ignore": 1})
                    next_id += 1
        filtered = A._with_confusions_ignored(index, results, same_super)
        assert len(filtered["annotations"]) < len(everything["annotations"])
        naive = A._coco_eval(everything, results, [0.1]).eval["precision"][0, :, :, 0, 0]
        ours = A._coco_eval(filtered, results, [0.1]).eval["precision"][0, :, :, 0, 0]
        assert np.array_equal(naive, ours), stage
        b = A.coco_breakdown(index, results)
        assert b.ap[stage] == pytest.approx(float(naive.mean()), abs=1e-12)
