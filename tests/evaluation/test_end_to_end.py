"""run_evaluation's output directory: it writes only into a new, empty or earlier report
directory (no Ray: the subject is a results file)."""

from __future__ import annotations

import json

import pytest

from detr_ray.data.demo import make_demo_dataset
from detr_ray.data.shards import coco_ground_truth
from detr_ray.evaluation.end_to_end import EvaluationOptions, run_evaluation
from detr_ray.evaluation.inference import InferenceConfig
from detr_ray.evaluation.subject import from_results
from detr_ray.ownership import NotOwnedError


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("final")
    _, val = make_demo_dataset(root / "data", num_train=2, num_val=6, shard_size=8, workers=0)
    gt = coco_ground_truth(val)
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    (root / "perfect.json").write_text(json.dumps(results))
    return val, from_results(root / "perfect.json")


def test_a_report_is_never_written_over_other_files(subject, tmp_path):
    val, perfect = subject
    out = tmp_path / "evaluation"
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    options = EvaluationOptions(out=out, data=val, inference=InferenceConfig(progress=False), worst=1)
    with pytest.raises(NotOwnedError, match=f"{out}: holds files that detr-ray did not create \\(report.md\\)"):
        run_evaluation(perfect, options)
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "my own notes"


def test_a_rerun_replaces_its_own_report(subject, tmp_path):
    val, perfect = subject
    options = EvaluationOptions(
        out=tmp_path / "new" / "report", data=val, inference=InferenceConfig(progress=False), worst=1
    )
    report, _ = run_evaluation(perfect, options)
    assert report.metrics["AP"] == pytest.approx(1.0)
    report, paths = run_evaluation(perfect, options)  # into its own earlier report
    assert json.loads(paths["report.json"].read_text())["metrics"]["AP"] == pytest.approx(1.0)
