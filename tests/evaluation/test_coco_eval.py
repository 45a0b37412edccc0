import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ray.coco_eval import ResultsError, evaluate
from detr_ray.model.predict import detections_to_results


def _gt():
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    cats = [{"id": 3, "name": "square", "supercategory": "shape"}, {"id": 7, "name": "disc", "supercategory": "shape"}]
    anns = []
    for i, (img, cat, box) in enumerate(
        [(1, 3, [10, 10, 30, 20]), (1, 7, [50, 40, 40, 30]), (2, 3, [5, 5, 60, 60]), (3, 7, [20, 20, 10, 10])], start=1
    ):
        anns.append({"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": cats}


def _noisy_results(gt, seed=0):
    rng = np.random.default_rng(seed)
    results = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), w, h],
                "score": float(rng.uniform(0.5, 1)),
            }
        )
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": 3,
                "bbox": [0.0, 0.0, 15.0, 15.0],
                "score": float(rng.uniform(0, 0.6)),
            }
        )
    return results


def test_perfect_detections():
    gt = _gt()
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    ev = evaluate(gt, results)
    assert ev.metrics["val/AP"] == pytest.approx(1.0) and ev.metrics["val/AP50"] == pytest.approx(1.0)
    assert ev.metrics["val/mean_iou"] == pytest.approx(1.0)
    assert set(ev.metrics) == {
        f"val/{n}"
        for n in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "mean_iou")
    }


def test_equals_pycocotools_run_directly_on_the_files(tmp_path):
    gt = _gt()
    results = _noisy_results(gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        E = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), "bbox")
        E.evaluate(), E.accumulate(), E.summarize()
    ours = evaluate(gt, results)
    assert [
        ours.metrics[f"val/{n}"]
        for n in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    ] == list(E.stats)
    assert 0 < ours.metrics["val/AP"] < 1


def test_mean_iou_of_true_positives():
    gt = _gt()
    # One detection on image 2's 60x60 box shifted right by 15 px: IoU = 45*60 / (75*60) = 0.6.
    results = [{"image_id": 2, "category_id": 3, "bbox": [20, 5, 60, 60], "score": 0.8}]
    ev = evaluate(gt, results)
    assert ev.metrics["val/mean_iou"] == pytest.approx(0.6)
    assert len(ev.tp_ious) == 1


def test_empty_and_malformed_result_sets():
    gt = _gt()
    ev = evaluate(gt, [])
    assert ev.metrics["val/AP"] == 0.0 and ev.metrics["val/mean_iou"] == 0.0
    with pytest.raises(ResultsError, match=r"results\[0\].image_id: 99"):
        evaluate(gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ResultsError, match=r"category_id: 4 .*category ids"):
        evaluate(gt, [{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ResultsError, match=r"bbox"):
        evaluate(gt, [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1], "score": 1.0}])
    with pytest.raises(ResultsError, match=r"missing key"):
        evaluate(gt, [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_detections_to_results_maps_labels_and_boxes():
    det = {
        "scores": torch.tensor([0.9, 0.1]),
        "labels": torch.tensor([1, 0]),
        "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
    }
    results = detections_to_results([2], [det], label_to_category_id=[3, 7])
    assert results[0] == {
        "image_id": 2,
        "category_id": 7,
        "bbox": [10.0, 20.0, 30.0, 40.0],
        "score": pytest.approx(0.9),
    }
    assert results[1]["category_id"] == 3


def test_per_category_and_per_iou_are_pycocotools_arrays():
    from detr_ray.coco_eval import ap_per_iou, per_category

    gt = _gt()
    results = _noisy_results(gt, seed=1)
    ev = evaluate(gt, results)
    rows = per_category(ev)
    assert [r["id"] for r in rows] == [3, 7] and [r["gt"] for r in rows] == [2, 2]
    assert [r["detections"] for r in rows] == [6, 2]
    E = ev.coco_eval
    for k, row in enumerate(rows):
        p = E.eval["precision"][:, :, k, 0, -1]
        assert row["AP"] == pytest.approx(p.mean()) and row["AP50"] == pytest.approx(p[0].mean())
    assert np.mean([r["AP"] for r in rows]) == pytest.approx(ev.metrics["val/AP"])
    per_iou = ap_per_iou(ev)
    assert list(per_iou) == [f"{t:.2f}" for t in np.linspace(0.5, 0.95, 10)]
    assert per_iou["0.50"] == pytest.approx(ev.metrics["val/AP50"]) and per_iou["0.75"] == pytest.approx(
        ev.metrics["val/AP75"]
    )
    assert np.mean(list(per_iou.values())) == pytest.approx(ev.metrics["val/AP"])
    empty = evaluate(gt, [])
    assert [r["AP"] for r in per_category(empty)] == [0.0, 0.0] and set(ap_per_iou(empty).values()) == {0.0}


def test_results_file_round_trip_and_errors(tmp_path):
    from detr_ray.coco_eval import load_results, write_results

    results = _noisy_results(_gt(), seed=2)
    path = write_results(tmp_path / "r.json", results)
    assert load_results(path) == results  # floats survive exactly
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultsError, match=r"bad.json: not valid JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text('{"annotations": []}')
    with pytest.raises(ResultsError, match=r"dict.json: expected a JSON list"):
        load_results(tmp_path / "dict.json")
    with pytest.raises(ResultsError, match=r"missing.json: cannot read"):
        load_results(tmp_path / "missing.json")


def test_labels_instead_of_category_ids_are_a_clear_error():
    gt = _gt()  # category ids 3 and 7; a model's contiguous labels would be 0 and 1
    results = [{"image_id": 1, "category_id": 0, "bbox": [10, 10, 30, 20], "score": 0.9}]
    with pytest.raises(
        ResultsError, match=r"results\[0\].category_id: 0 is not a category .*mapped to the dataset's category ids"
    ):
        evaluate(gt, results)
