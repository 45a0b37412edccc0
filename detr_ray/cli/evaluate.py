"""Final COCO evaluation of a checkpoint, or of the best checkpoint of a tuning experiment, with
error analysis and a report (report.md, report.json, figures/).

  python scripts/evaluate.py --experiment runs/demo-sweep            # best trial's best checkpoint
  python scripts/evaluate.py --checkpoint runs/detr-demo/checkpoint_epoch0010 --out eval/demo
  python scripts/evaluate.py --experiment s3://bucket/sweeps/r50 --data s3://bucket/coco/val \
      --compare runs/r101-run/checkpoint_epoch0050 other_detector_results.json

A sweep with several objectives leaves a Pareto front in best.json; --choose picks the member to
evaluate, e.g. --choose "max val/AP subject to model/parameters<=2e6" or --choose val/AP (refused
without one when the front has more than one member). For a sweep the report adds its study:
optimisation history, parallel coordinates, every trial's learning curve with ASHA's rungs,
parameter importances, compute spent against a full-budget grid, and the Pareto front.

--data defaults to the val shards the run trained with. --compare takes checkpoint directories,
experiment directories, published DETR weights or COCO results JSON files of other detectors;
each is scored on the same images and shown as a column next to the evaluated one.

Published DETR weights (the reference repository's files, e.g. detr-r50-e632da11.pth, or its
training checkpoint.pth; a local file, an http(s) URL or an s3://, gs:// URI) are scored as the
model they were trained as: backbone (R18/34/50/101), hidden size, layers and queries are read
from the tensors; DC5 from the reference checkpoint's args or the published file name (a "dc5"
name is DC5, detr-r50-<hash>.pth / detr-r101-<hash>.pth are not), otherwise --set
model.dilation=true|false is required; the class head is mapped to the data's categories:

  python scripts/evaluate.py --checkpoint detr-r50-e632da11.pth --data coco/val
  python scripts/evaluate.py --experiment runs/coco_finetune --data coco/val \
      --compare https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth

Runs on the local Ray, or on a cluster when RAY_ADDRESS is set (GPU actors when it has GPUs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from detr_ray.checkpoint import CheckpointError
from detr_ray.cli.arguments import add_model_source
from detr_ray.coco_eval import ResultsError
from detr_ray.config import ConfigError
from detr_ray.data.shards import ShardError
from detr_ray.evaluation.end_to_end import EvaluationOptions, run_evaluation
from detr_ray.evaluation.inference import InferenceConfig, InferenceError
from detr_ray.evaluation.subject import EvaluationTargetError, from_experiment, resolve, subject_for_checkpoint
from detr_ray.ownership import NotOwnedError

ERRORS = (
    EvaluationTargetError,
    ResultsError,
    InferenceError,
    CheckpointError,
    ShardError,
    ConfigError,
    NotOwnedError,
    FileNotFoundError,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(
        p,
        checkpoint_metavar="DIR_OR_FILE",
        checkpoint_help="a checkpoint directory (checkpoint_epochNNNN) or published DETR weights (.pth file, URL)",
    )
    p.add_argument(
        "--choose",
        metavar="RULE",
        help="a Pareto front's member to evaluate: '[max|min] METRIC "
        "[subject to METRIC<=NUMBER [and ...]]' (several objectives only)",
    )
    p.add_argument("--data", metavar="VAL_SHARDS", help="val shard directory or URI; default: the run's own")
    p.add_argument(
        "--out",
        metavar="REPORT_DIR",
        default="evaluation",
        help="output directory: new, empty or an earlier report's (default: ./evaluation)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="OTHER",
        help="checkpoints, experiments, published DETR weights or COCO results files to compare",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="for published DETR weights: a model.* or data.* setting the file cannot tell, e.g. model.dilation=true",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per inference batch")
    p.add_argument("--actors", type=int, default=0, help="inference actors (default: one per GPU, else one)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument(
        "--device",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="inference device (auto: GPUs when the cluster has them)",
    )
    p.add_argument("--score-threshold", type=float, default=0.5, help="detections drawn on the worst images")
    p.add_argument("--worst", type=int, default=6, help="how many worst images / categories to show")
    p.add_argument(
        "--latency-images", type=int, default=20, help="val images timed at batch 1 per checkpoint (0: no cost columns)"
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no RAY_ADDRESS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _ray(num_cpus: int | None) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else num_cpus, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False  # ours (tqdm) counts images instead


def _print_summary(report, paths: dict) -> None:
    m = report.metrics
    others = report.comparison
    names = [report.title] + [o["name"] for o in others]
    width = max(12, *(len(n) for n in names))
    print("\n" + "metric".ljust(10) + "".join(n.rjust(width + 2) for n in names))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "mean_iou"):
        values = [m[key]] + [o["metrics"][key] for o in others]
        print(key.ljust(10) + "".join(f"{v:.3f}".rjust(width + 2) for v in values))
    t = report.analysis.tide
    print(f"\nTIDE (AP50 {t.base_ap50:.3f}): dAP50 per error type (count)")
    for name, e in t.errors.items():
        print(f"  {name:15s} {e['dAP']:+.3f} ({e['count']})")
    costs = [(report.title, report.efficiency)] + [(o["name"], o.get("efficiency")) for o in others]
    if any(e for _, e in costs):
        print(
            "\ncost (measured here): parameters, GFLOPs at the val resolution, latency batch 1 p50/p90, training "
            "images/s"
        )
        for name, e in costs:
            if e:
                ips = f"{e['train_images_per_s']:.1f}" if e["train_images_per_s"] is not None else "n/a"
                print(
                    f"  {name:{width}s} {e['arch']:28s} {e['parameters'] / 1e6:7.2f} M {e['gflops']:8.2f} GFLOPs "
                    f"{e['latency_ms']['p50']:8.1f} / {e['latency_ms']['p90']:.1f} ms  {ips} img/s"
                )
    if report.inference:
        inf = report.inference
        print(
            f"\ninference: {inf['images']} images, {inf['images_per_s']:.1f} images/s on {inf['actors']} "
            f"{inf['device']} actor(s)"
        )
    print(f"\nreport: {paths['report.md']}\n        {paths['report.json']}  ({len(paths) - 2} figures)")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = InferenceConfig(
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        use_gpu={"auto": None, "gpu": True, "cpu": False}[args.device],
        progress=not args.no_progress,
    )
    options = EvaluationOptions(
        out=Path(args.out),
        data=args.data,
        inference=cfg,
        score_threshold=args.score_threshold,
        worst=args.worst,
        latency_images=args.latency_images,
    )
    with tempfile.TemporaryDirectory(prefix="detr-eval-") as workdir:  # checkpoints fetched from URIs
        try:
            if args.choose and not args.experiment:
                raise EvaluationTargetError(
                    "--choose picks a member of an experiment's Pareto front: it needs --experiment"
                )
            if args.experiment:
                subject = from_experiment(args.experiment, workdir, choose=args.choose)
            else:
                subject = subject_for_checkpoint(args.checkpoint, workdir, args.data, args.set)
            compare = [resolve(spec, workdir, args.data or subject.val, args.set) for spec in args.compare]
            if args.set and not any(s.kind == "published" for s in [subject, *compare]):
                raise EvaluationTargetError("--set applies to published DETR weights only, and none is evaluated")
            for s in [subject, *compare]:
                if s.weights:
                    print(f"published {s.source}\n  sha256 {s.weights['sha256']}\n  {s.weights['load']['summary']}")
            print(
                f"evaluating {subject.kind} {subject.source}\n  checkpoint {subject.checkpoint}\n  val data   "
                f"{args.data or subject.val}"
            )
            if subject.front:
                print(
                    f"  trial {subject.trial} of a Pareto front of {len(subject.front)}"
                    + (f", chosen by {subject.choice!r}" if subject.choice else "")
                )
            _ray(args.num_cpus)
            report, paths = run_evaluation(subject, options, compare)
        except ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    _print_summary(report, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
