"""scripts/evaluate.py end to end on the tiny trained checkpoint: an experiment directory, a
compared checkpoint and a compared results file of "another detector"; the report's numbers
against pycocotools run directly on the files it wrote."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from detr_ray import checkpoint as ckpt
from detr_ray.coco_eval import METRIC_NAMES, ResultsError, as_coco
from detr_ray.data.shards import coco_ground_truth
from detr_ray.evaluation.analysis import FP_TYPES
from detr_ray.evaluation.end_to_end import score
from detr_ray.evaluation.inference import InferenceConfig
from detr_ray.evaluation.subject import from_results
from tests.evaluation.conftest import make_experiment
from tests.evaluation.synthetic import coco_eval, coco_matches, random_dataset

pytestmark = pytest.mark.timeout(400)
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _other_detector(gt: dict, path: Path) -> Path:
    """A decent detector's results on the same images: jittered true boxes and a few misfires."""
    rng = np.random.default_rng(0)
    results = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x + rng.uniform(-2, 2), y + rng.uniform(-2, 2), w, h],
                "score": float(rng.uniform(0.5, 1)),
            }
        )
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": 1 + (a["category_id"] % 3),
                "bbox": [x, y, w / 2, h / 2],
                "score": 0.3,
            }
        )
    path.write_text(json.dumps(results))
    return path


def test_experiment_report_end_to_end(tiny_run, tmp_path, capsys):
    exp = make_experiment(tmp_path / "sweep", tiny_run)
    gt = coco_ground_truth(tiny_run["val"])
    other = _other_detector(gt, tmp_path / "other_detector.json")
    out = tmp_path / "report"
    rc = _script().main(
        [
            "--experiment",
            str(exp),
            "--out",
            str(out),
            "--compare",
            tiny_run["checkpoint_epoch1"],
            str(other),
            "--batch-size",
            "4",
            "--worst",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and str(out / "report.md") in printed

    report = json.loads((out / "report.json").read_text())
    assert report["subject"]["trial"] == "t1" and report["subject"]["checkpoint"] == tiny_run["checkpoint"]
    assert report["data"]["val"] == tiny_run["val"] and report["data"]["images"] == 12
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == 12 * 5 and {d["category_id"] for d in detections} <= {1, 2, 3}
    assert report["inference"]["images"] == 12 and report["inference"]["device"] == "cpu"

    # The numbers are pycocotools' own on the files as written.
    written_gt = json.loads((out / "ground_truth.json").read_text())
    assert written_gt == gt
    E = coco_eval(written_gt, detections)
    assert [report["metrics"][n] for n in METRIC_NAMES] == list(E.stats)
    precision = E.eval["precision"][:, :, :, 0, -1]
    for k, row in enumerate(report["per_category"]):
        valid = precision[:, :, k]
        assert row["AP"] == (float(valid.mean()) if valid.min() > -1 else -1.0)
    assert report["ap_per_iou"]["0.50"] == pytest.approx(E.stats[1], abs=1e-12)

    # The analysis adds up against COCOeval's own matching at IoU 0.5.
    tp, fp, found = coco_matches(E, 0)
    tide = report["analysis"]["tide"]
    assert tide["base_AP50"] == E.stats[1]
    assert sum(tide["errors"][t]["count"] for t in FP_TYPES) == len(fp)
    assert tide["detections"].get("tp", 0) == len(tp)
    statuses = tide["ground_truth"]
    assert statuses.get("matched", 0) == len(found)
    assert sum(statuses.values()) == sum(1 for a in gt["annotations"] if not a["iscrowd"])
    assert report["analysis"]["coco_breakdown"]["AP"]["C50"] == pytest.approx(E.stats[1], abs=1e-12)

    # The compared detectors: a checkpoint (inferred on the same images) and a results file.
    names = [c["name"] for c in report["comparison"]]
    assert names == ["checkpoint_epoch0001", "other_detector"]
    assert (out / "compare" / "checkpoint_epoch0001.json").is_file()
    direct = coco_eval(written_gt, json.loads(other.read_text()))
    assert [report["comparison"][1]["metrics"][n] for n in METRIC_NAMES] == list(direct.stats)
    assert report["comparison"][1]["metrics"]["AP50"] > 0.9  # the jittered ground truth is a good detector

    md = (out / "report.md").read_text()
    assert "| metric |  | sweep:t1 | checkpoint_epoch0001 | other_detector |" in md
    assert "| t1 (evaluated) | completed |" in md and "| t3 | error |" in md
    assert isinstance(report["importances"], dict) and set(report["importances"]) == {"train.lr", "model.backbone"}
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    for rel in report["figures"].values():
        assert (out / rel).stat().st_size > 1000
    assert {"pr_overall", "coco_breakdown", "tide", "tp_iou", "training"} <= set(report["figures"])


def test_checkpoint_with_other_data_and_a_progress_bar(tiny_run, tmp_path, capsys):
    """--checkpoint alone (no sweep): --data replaces the run's own val shards, a progress bar
    counts the images, the training curves come from the run's TensorBoard scalars."""
    data = tmp_path / "other-val"
    shutil.copytree(tiny_run["val"], data)
    out = tmp_path / "report"
    rc = _script().main(
        [
            "--checkpoint",
            tiny_run["checkpoint"],
            "--data",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--worst",
            "2",
        ]
    )
    assert rc == 0
    assert re.search(r"inference: 100%\|.*\| 12/12 ", capsys.readouterr().err)

    report = json.loads((out / "report.json").read_text())
    assert report["subject"]["kind"] == "checkpoint" and report["subject"]["checkpoint"] == tiny_run["checkpoint"]
    assert report["data"]["val"] == str(data) and report["data"]["images"] == 12
    E = coco_eval(
        json.loads((out / "ground_truth.json").read_text()), json.loads((out / "detections.json").read_text())
    )
    assert [report["metrics"][n] for n in METRIC_NAMES] == list(E.stats)
    state = json.loads((Path(tiny_run["checkpoint"]) / ckpt.STATE).read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert report["history"][-1]["val/AP"] == pytest.approx(
        state["metrics"]["val/AP"], rel=1e-6
    )  # float32 in TensorBoard
    assert report["trials"] == [] and report["importances"] is None and report["comparison"] == []
    assert {"training", "worst_false_negatives", "pr_overall"} <= set(report["figures"])
    md = (out / "report.md").read_text()
    assert "## Training" in md and "## Trials" not in md


def test_compare_with_the_same_checkpoint_name_from_another_run(tiny_run, tmp_path):
    """--checkpoint and --compare given two runs' checkpoint_epoch0010 as URIs (fetched into one
    work directory): each is scored with its own weights, so their detections differ."""
    for run, source in (("run_a", tiny_run["checkpoint"]), ("run_b", tiny_run["checkpoint_epoch1"])):
        shutil.copytree(source, tmp_path / run / "checkpoint_epoch0010")
    out = tmp_path / "report"
    rc = _script().main(
        [
            "--checkpoint",
            f"file://{tmp_path}/run_a/checkpoint_epoch0010",
            "--data",
            tiny_run["val"],
            "--out",
            str(out),
            "--compare",
            f"file://{tmp_path}/run_b/checkpoint_epoch0010",
            "--batch-size",
            "4",
            "--worst",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["title"] == "checkpoint_epoch0010" and [c["name"] for c in report["comparison"]] == [
        "checkpoint_epoch0010'"
    ]
    main = json.loads((out / "detections.json").read_text())
    other = json.loads((out / "compare" / "checkpoint_epoch0010.json").read_text())
    assert len(main) == len(other) == 12 * 5
    assert main != other  # one set of weights scored twice would give the same detections


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    script = _script()
    assert script.main(["--experiment", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: neither best.json nor trials.json" in capsys.readouterr().err
    assert script.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope: not a checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--experiment", "a", "--checkpoint", "b"])


def test_empty_and_malformed_results_files(tmp_path):
    gt, _ = random_dataset(seed=9, n_images=5)
    coco = as_coco(gt)
    cfg = InferenceConfig(progress=False)
    (tmp_path / "empty.json").write_text("[]")
    scored = score(from_results(tmp_path / "empty.json"), "unused", coco, tmp_path / "x.json", cfg)
    assert scored.evaluation.metrics["AP"] == 0.0 and scored.evaluation.metrics["AR100"] == 0.0
    (tmp_path / "unknown.json").write_text(
        json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    )
    with pytest.raises(ResultsError, match=r"unknown.json\[0\].image_id: 999 is not an image"):
        score(from_results(tmp_path / "unknown.json"), "unused", coco, tmp_path / "x.json", cfg)
    (tmp_path / "labels.json").write_text(
        json.dumps([{"image_id": 1, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 0.5}])
    )
    with pytest.raises(ResultsError, match=r"labels.json\[0\].category_id: 0 is not a category"):
        score(from_results(tmp_path / "labels.json"), "unused", coco, tmp_path / "x.json", cfg)
    (tmp_path / "object.json").write_text("{}")
    with pytest.raises(ResultsError, match=r"object.json: expected a JSON list"):
        score(from_results(tmp_path / "object.json"), "unused", coco, tmp_path / "x.json", cfg)
