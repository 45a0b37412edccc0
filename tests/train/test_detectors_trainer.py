"""A torchvision detector (model.arch) through the real Ray Train trainer, checkpoint, relaunch,
Ray Data evaluation with the cost columns, and a Tune sweep over model.arch; one local Ray."""

import contextlib
import io
import json

import pytest
import ray
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_ray import checkpoint as ckpt
from detr_ray.coco_eval import METRIC_NAMES
from detr_ray.config import experiment_from_dict
from detr_ray.data.demo import ensure_demo_shards
from detr_ray.evaluation.end_to_end import EvaluationOptions, run_evaluation
from detr_ray.evaluation.inference import InferenceConfig
from detr_ray.evaluation.subject import from_checkpoint
from detr_ray.local_ray import init as init_local_ray
from detr_ray.train.trainer import build_trainer, demo_experiment
from detr_ray.tune.space import parse_space
from detr_ray.tune.summary import summarize
from detr_ray.tune.tuner import build_sweep
from tests.tiny_sweep import demo_shards

ARCH = "fcos_resnet50_fpn"

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_shards(root, num_train=16, num_val=8)
    return root


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # With the dashboard, Ray Train's PlacementGroupCleaner sees (state API) that a finished trial's
    # controller is gone and frees its placement group at once; without it the group waits for the
    # sweep's watch (RELEASE_GRACE_S, 20 s), and on 2 CPUs the next trial waits with it.
    init_local_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


def _experiment(root, **train):
    exp = demo_experiment()
    exp["model"]["arch"] = ARCH
    exp["data"].update(demo_shards(root), batch_size=4, shuffle_buffer=8)
    exp["train"].update(
        {
            "epochs": 1,
            "max_steps_per_epoch": 1,
            "max_failures": 0,
            "cpus_per_worker": 1.0,
            "tensorboard": False,
            **train,
        }
    )
    return exp


@pytest.mark.timeout(400)
def test_trains_resumes_and_is_evaluated_like_detr(demo_root, tmp_path):
    first = build_trainer(
        experiment_from_dict(_experiment(demo_root)), name="fcos", storage_path=str(tmp_path / "runs")
    ).fit()
    m = first.metrics
    for key in (
        "train/loss",
        "train/loss_classification",
        "train/loss_bbox_regression",
        "train/loss_bbox_ctrness",
        "lr",
        "lr_backbone",
        "train/images_per_s",
        "val/AP",
        "val/AP50",
        "val/AR100",
        "val/mean_iou",
    ):
        assert key in m, key
    assert m["epoch"] == 1 and m["checkpoint_score"] == m["val/AP"]
    state = ckpt.load(first.checkpoint.path).state
    assert state.config["model"]["arch"] == ARCH and state.categories["label_to_category_id"] == [1, 2, 3]

    second = build_trainer(
        experiment_from_dict(_experiment(demo_root, epochs=2)), name="fcos", storage_path=str(tmp_path / "runs")
    ).fit()
    assert (
        second.metrics["epoch"] == 2 and second.metrics["train/start_epoch"] == 1 and second.metrics["global_step"] == 2
    )

    # evaluate.py's path: Ray Data inference, pycocotools, analysis, the report with cost columns.
    subject = from_checkpoint(second.checkpoint.path, str(tmp_path / "work"))
    other = from_checkpoint(first.checkpoint.path, str(tmp_path / "work"))
    options = EvaluationOptions(
        out=tmp_path / "eval", inference=InferenceConfig(batch_size=4, progress=False), latency_images=3
    )
    report, paths = run_evaluation(subject, options, [other])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "eval" / "ground_truth.json"))
        E = COCOeval(gt, gt.loadRes(str(tmp_path / "eval" / "detections.json")), "bbox")
        E.evaluate(), E.accumulate(), E.summarize()
    assert [report.metrics[n] for n in METRIC_NAMES] == pytest.approx(list(E.stats), abs=1e-12)
    for e in (report.efficiency, report.comparison[0]["efficiency"]):
        assert e["arch"] == ARCH and 30e6 < e["parameters"] < 34e6 and e["gflops"] > 0
        assert 0 < e["latency_ms"]["p50"] <= e["latency_ms"]["p90"] and e["latency_images"] == 3
    assert report.efficiency["train_images_per_s"] == pytest.approx(second.metrics["train/images_per_s"])
    text = paths["report.md"].read_text()
    assert "### Cost" in text and "latency p90, batch 1 (ms)" in text
    assert json.loads(paths["report.json"].read_text())["efficiency"]["arch"] == ARCH


@pytest.mark.sweep
@pytest.mark.timeout(400)
def test_a_sweep_chooses_between_detr_and_a_torchvision_detector(demo_root, tmp_path):
    experiment = _experiment(demo_root, max_steps_per_epoch=2, cpus_per_worker=0.5)
    experiment["model"] = {k: v for k, v in experiment["model"].items() if k != "arch"}
    experiment["model"].update(hidden_dim=32, dim_feedforward=64, num_queries=5)
    experiment["data"]["decode_num_cpus"] = 0.25
    space = parse_space(
        {
            "experiment": experiment,
            "search": {"model.arch": {"choice": ["detr", ARCH]}},
            "scheduler": {"grace_period": 1, "num_samples": 2, "seed": 0},  # seed 0: TPE draws both
        },
        "test space",
    )
    sweep = build_sweep(space, name="archs", storage_path=str(tmp_path / "sweeps"))
    results = sweep.fit()
    assert len(results) == 2 and not results.errors
    rows, best = summarize(results, space)
    assert sorted(r["config"]["model.arch"] for r in rows) == sorted(["detr", ARCH])
    for r in rows:
        assert r["status"] == "completed" and isinstance(r["best"], float)
        state = json.loads(open(f"{r['checkpoint']}/state.json").read())
        assert state["config"]["model"]["arch"] == r["config"]["model.arch"]
        assert state["metrics"]["train/steps"] == 2
