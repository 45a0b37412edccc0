import json
import re

import numpy as np
import pytest
from PIL import Image

from detr_ray.coco_eval import ap_per_iou, evaluate, per_category
from detr_ray.evaluation.analysis import ERROR_TYPES, GroundTruth, analyze, tide
from detr_ray.evaluation.report import Report, write_report
from tests.evaluation.synthetic import random_dataset


def _report(**overrides) -> Report:
    gt, results = random_dataset(seed=7, n_images=24)
    ev = evaluate(gt, results, prefix="")
    an = analyze(ev, results, score_threshold=0.5, worst_k=4)
    ids = {e["image_id"] for e in an.worst.false_positives + an.worst.false_negatives}
    other = [dict(r, score=r["score"] * 0.5) for r in results[::2]]
    other_ev = evaluate(gt, other, prefix="")
    other_tide = tide(GroundTruth(gt), other)
    fields = dict(
        title="my-sweep:t1",
        subject={
            "name": "my-sweep:t1",
            "kind": "experiment",
            "source": "/runs/my-sweep",
            "checkpoint": "/runs/ckpt",
            "trial": "t1",
            "metric": "val/AP",
            "mode": "max",
            "best_value": 0.25,
        },
        data={"val": "/data/val", "images": 24, "annotations": len(gt["annotations"]), "categories": 4},
        metrics=ev.metrics,
        ap_per_iou=ap_per_iou(ev),
        per_category=per_category(ev),
        analysis=an,
        inference={
            "images": 24,
            "skipped_images": [],
            "detections": len(results),
            "seconds": 2.0,
            "images_per_s": 12.0,
            "device": "cpu",
            "actors": 1,
        },
        files={"results": "detections.json", "ground_truth": "ground_truth.json"},
        config={"model": {"backbone": "resnet18"}, "train": {"lr": 2e-4}},
        hyperparameters={"train.lr": 2e-4, "model.backbone": "resnet18"},
        history=[{"epoch": e, "train/loss": 10.0 / e, "val/AP": 0.05 * e, "val/AP50": 0.1 * e} for e in (1, 2, 3)],
        trials=[
            {
                "trial": "t1",
                "config": {"train.lr": 2e-4},
                "best": 0.25,
                "epochs": 3,
                "status": "completed",
                "checkpoint": "/c",
            },
            {
                "trial": "t2",
                "config": {"train.lr": 9e-4},
                "best": 0.05,
                "epochs": 1,
                "status": "stopped early (ASHA)",
                "checkpoint": None,
            },
            {
                "trial": "t3",
                "config": {"train.lr": 1e-4},
                "best": None,
                "epochs": 0,
                "status": "error",
                "checkpoint": None,
            },
        ],
        importances={"train.lr": 0.8, "model.backbone": 0.2},
        comparison=[
            {
                "name": "half-scores",
                "kind": "results",
                "source": "/other.json",
                "metrics": other_ev.metrics,
                "per_category": {row["id"]: row["AP"] for row in per_category(other_ev)},
                "tide": {k: v["dAP"] for k, v in other_tide.errors.items()},
            }
        ],
        images={i: np.full((150, 200, 3), 90, dtype=np.uint8) for i in ids},
    )
    fields.update(overrides)
    return Report(**fields)


def test_full_report(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path)
    names = {
        "pr_overall",
        "pr_worst_categories",
        "coco_breakdown",
        "tide",
        "tp_iou",
        "training",
        "worst_false_positives",
        "worst_false_negatives",
    }
    assert names <= set(paths)
    for name in names:
        with Image.open(paths[name]) as im:
            assert im.format == "PNG" and 300 < im.width < 2000 and 200 < im.height < 2000

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["metrics"] == report.metrics
    assert data["analysis"]["tide"]["errors"].keys() == set(ERROR_TYPES)
    assert len(data["analysis"]["pr_curves"]["overall"]["0.50"]) == 101
    assert data["comparison"][0]["name"] == "half-scores" and data["importances"]["train.lr"] == 0.8
    for rel in data["figures"].values():
        assert (tmp_path / rel).is_file()

    md = (tmp_path / "report.md").read_text()
    for heading in (
        "# Evaluation: my-sweep:t1",
        "## Metrics",
        "### AP at each IoU threshold",
        "## Per category",
        "### TIDE error types",
        "### COCO analysis",
        "### IoU of true positives",
        "### Images with the most errors",
        "## Training",
        "## Trials",
        "### Parameter importances",
    ):
        assert heading in md, heading
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / link).is_file(), link
    assert len(re.findall(r"!\[", md)) == len(names)
    # Metrics table: ours and the compared detector side by side.
    row = next(line for line in md.splitlines() if line.startswith("| AP50 |"))
    assert row.split("|")[3].strip() == f"{report.metrics['AP50']:.3f}"
    assert row.split("|")[4].strip() == f"{report.comparison[0]['metrics']['AP50']:.3f}"
    assert "| metric |  | my-sweep:t1 | half-scores |" in md
    for c in report.per_category:
        assert f"| {c['id']} | {c['name']} | {c['supercategory']} |" in md
    for e in ERROR_TYPES:
        assert f"| {e} | {report.analysis.tide.errors[e]['count']} |" in md
    assert "| t1 (evaluated) | completed | 3 |" in md and "stopped early (ASHA)" in md and "| t3 | error |" in md
    assert md.index("| t1 (evaluated)") < md.index("| t2 |") < md.index("| t3 |")  # best first
    assert "| train.lr | 0.800 |" in md
    assert "| 3 | 3.333 | 0.150 | 0.300 |" in md  # the training curve table


def test_report_without_sweep_history_or_detections(tmp_path):
    gt, _ = random_dataset(seed=8, n_images=6)
    ev = evaluate(gt, [], prefix="")
    report = _report(
        metrics=ev.metrics,
        ap_per_iou=ap_per_iou(ev),
        per_category=per_category(ev),
        analysis=analyze(ev, []),
        history=[],
        trials=[],
        importances=None,
        comparison=[],
        images={},
        inference=None,
    )
    paths = write_report(report, tmp_path)
    assert "training" not in paths and "worst_false_positives" not in paths and "worst_false_negatives" in paths
    with Image.open(paths["worst_false_negatives"]) as im:  # no pixels: boxes on grey, at the image's size
        assert im.width < 2000 and im.height < 2000
    md = (tmp_path / "report.md").read_text()
    assert "No training history was found" in md and "## Trials" not in md
    assert json.loads((tmp_path / "report.json").read_text())["metrics"]["AP"] == 0.0


def test_importances_note_is_shown(tmp_path):
    write_report(_report(importances="not enough trials (1 finished with a value; 2 needed)"), tmp_path)
    assert "not enough trials (1 finished" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("value,text", [(-1.0, "n/a"), (0.0, "0.000"), (0.1234, "0.123"), (3e-5, "3.00e-05")])
def test_number_format(value, text):
    from detr_ray.evaluation.report import _num

    assert _num(value) == text
