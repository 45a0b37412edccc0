"""The final evaluation of one subject (a checkpoint or an experiment's best), end to end:

    val shards -> ground_truth.json (COCO)
    subject    -> Ray Data inference -> detections.json (COCO results, the dataset's category ids)
               -> pycocotools on the files as written -> metrics, per category, per IoU threshold
               -> analysis (TIDE, COCO breakdown, PR curves, IoU of true positives, worst images)
    --compare  -> the same inference and scoring for each other subject (or its results file),
                  on the same images: compare/<name>.json and a column in each table
    checkpoints-> what each costs, measured here (efficiency.py): parameters, GFLOPs, batch-1
                  latency p50/p90, and the training images/s its run recorded
               -> report.md, report.json, figures/ (report.py)

The numbers in the report are pycocotools' own on `ground_truth.json` and `detections.json`.
The output directory must be new, empty or an earlier report's (ownership.claim): the report
replaces only files detr-ray wrote.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detr_ray.coco_eval import Evaluation, ap_per_iou, as_coco, evaluate, load_results, per_category, write_results
from detr_ray.data.images import decode_rgb
from detr_ray.data.shards import coco_ground_truth, read_rows
from detr_ray.evaluation import sweep_report
from detr_ray.evaluation.analysis import Analysis, GroundTruth, analyze, tide
from detr_ray.evaluation.efficiency import measure
from detr_ray.evaluation.inference import Inference, InferenceConfig, load_detector, run_inference
from detr_ray.evaluation.report import Report, write_report
from detr_ray.evaluation.subject import EvaluationTarget, EvaluationTargetError
from detr_ray.evaluation.training_history import parameter_importances
from detr_ray.ownership import claim

log = logging.getLogger(__name__)

OWNER = "detr_ray.evaluation"  # the marker's name for a report directory
RESULTS_FILE = "detections.json"
GROUND_TRUTH_FILE = "ground_truth.json"


@dataclass
class EvaluationOptions:
    out: Path
    data: str | None = None  # val shards; default: the ones the subject trained with
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    score_threshold: float = 0.5  # for the worst-image pictures
    worst: int = 6  # images with the most errors, and lowest-AP categories, shown
    latency_images: int = 20  # val images timed one by one per checkpoint (0: no cost measurement)


@dataclass
class ScoredTarget:
    """One evaluation target's detections on the val images and their pycocotools scores (with
    the inference run and the measured cost, for a checkpoint)."""

    subject: EvaluationTarget
    results_file: Path
    results: list[dict]
    evaluation: Evaluation
    inference: Inference | None = None
    efficiency: dict | None = None


def score(
    subject: EvaluationTarget, val: str, gt, results_file: Path, cfg: InferenceConfig, latency_images: int = 0
) -> ScoredTarget:
    """Detections of `subject` on `val` (inference, or its own results file), written to and read
    back from `results_file`, scored by pycocotools against `gt`; a checkpoint's cost measured
    on `latency_images` val images (0: not measured)."""
    inference = efficiency = None
    if subject.kind == "results":
        results_file = subject.results_file
    else:
        detector = load_detector(subject.checkpoint, subject.manifest)
        inference = run_inference(detector, val, cfg)
        write_results(results_file, inference.results)
        if latency_images:
            efficiency = measure(detector, val, images=latency_images)
    results = load_results(results_file)
    evaluation = evaluate(gt, results, prefix="", source=str(results_file))
    return ScoredTarget(subject, results_file, results, evaluation, inference, efficiency)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "subject"


def _pixels(val: str, analysis: Analysis) -> dict[int, np.ndarray]:
    ids = {e["image_id"] for e in analysis.worst.false_positives + analysis.worst.false_negatives}
    out = {}
    # The same decode as training and inference (colour modes, EXIF rule), so boxes land on the
    # pixels they were predicted on.
    for image_id, row in read_rows(val, ids, columns=("image", "height", "width")).items():
        try:
            out[image_id] = decode_rgb(row["image"], row["height"], row["width"]).permute(1, 2, 0).numpy()
        except Exception as e:  # an undecodable image is drawn as a blank panel
            log.warning("image %s cannot be decoded for drawing: %s", image_id, e)
    return out


def _comparison_row(scored: ScoredTarget, gt: GroundTruth) -> dict:
    t = tide(gt, scored.results)
    return {
        "name": scored.subject.name,
        "kind": scored.subject.kind,
        "source": scored.subject.source,
        "results_file": str(scored.results_file),
        "metrics": scored.evaluation.metrics,
        "per_category": {row["id"]: row["AP"] for row in per_category(scored.evaluation)},
        "tide": {
            **{k: v["dAP"] for k, v in t.errors.items()},
            "false_positives": t.false_positives_dap,
            "false_negatives": t.false_negatives_dap,
        },
        "inference": scored.inference.summary() if scored.inference else None,
        "efficiency": scored.efficiency,
        **({"weights": scored.subject.weights} if scored.subject.weights else {}),
    }


def run_evaluation(
    subject: EvaluationTarget, options: EvaluationOptions, compare: list[EvaluationTarget] = ()
) -> tuple[Report, dict[str, Path]]:
    """Evaluates `subject` (and `compare`) on the val data and writes the report to options.out."""
    val = options.data or subject.val
    if not val:
        raise EvaluationTargetError(
            f"{subject.source}: no validation data is known for it; give the val shards (--data)"
        )
    out = claim(options.out, OWNER)
    gt_dict = coco_ground_truth(val)
    (out / GROUND_TRUTH_FILE).write_text(json.dumps(gt_dict))
    gt = as_coco(gt_dict)

    main = score(subject, val, gt, out / RESULTS_FILE, options.inference, options.latency_images)
    analysis = analyze(main.evaluation, main.results, score_threshold=options.score_threshold, worst_k=options.worst)

    rows, names = [], {subject.name}
    index = GroundTruth(gt)
    for other in compare:
        name = other.name
        while name in names:
            name += "'"
        names.add(name)
        other.name = name
        scored = score(
            other, val, gt, out / "compare" / f"{_slug(name)}.json", options.inference, options.latency_images
        )
        rows.append(_comparison_row(scored, index))

    n_boxes = sum(1 for a in gt_dict["annotations"] if not a.get("iscrowd"))
    report = Report(
        title=subject.name,
        subject=subject.describe(),
        data={
            "val": val,
            "images": len(gt_dict["images"]),
            "annotations": n_boxes,
            "categories": len(gt_dict["categories"]),
        },
        metrics=main.evaluation.metrics,
        ap_per_iou=ap_per_iou(main.evaluation),
        per_category=per_category(main.evaluation),
        analysis=analysis,
        inference=main.inference.summary() if main.inference else None,
        efficiency=main.efficiency,
        files={
            "results": str(main.results_file.relative_to(out))
            if main.results_file.is_relative_to(out)
            else str(main.results_file),
            "ground_truth": GROUND_TRUTH_FILE,
        },
        config=subject.experiment,
        hyperparameters=subject.hyperparameters,
        history=subject.history,
        trials=subject.trials,
        importances=parameter_importances(subject) if subject.kind == "experiment" else None,
        sweep=sweep_report.summarize(subject) if subject.kind == "experiment" else None,
        comparison=rows,
        images=_pixels(val, analysis),
    )
    return report, write_report(report, out)
