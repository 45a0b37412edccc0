"""Train DETR and torchvision detectors with the same budget on the same shards, evaluate them on
the same val images, and write one comparison report.

  python scripts/benchmark_detectors.py                                   # the demo data
  python scripts/benchmark_detectors.py --data /data/coco-shards --epochs 12 --gpus-per-worker 1 \\
      --config my_detr.yaml --out bench/coco12
  python scripts/benchmark_detectors.py --archs detr fcos_resnet50_fpn --epochs 2 --max-steps-per-epoch 6 \\
      --record benchmarks/results/detectors_demo

The budget is the same for every architecture: the same epochs and steps per epoch (so the same
images, augmentations and batch size), the same optimizer settings (AdamW, lr, lr_backbone,
weight decay, clipping, schedule) from one experiment (the demo experiment, or --config), only
model.arch differs. Training time is measured, not equalised: it is the x axis of one figure.
Each run validates at its last epoch; the final evaluation then runs evaluate.py's path on the
best checkpoint of each (Ray Data inference, pycocotools, TIDE, cost columns measured here).

--out (new, empty or an earlier benchmark's directory that holds no runs yet) receives:
    report.md, report.json        the comparison: AP, AP50, AP75, APs/m/l, AR100, mean IoU of
                                  true positives, TIDE dAPs, parameters, GFLOPs, latency p50/p90,
                                  training images/s and time, machine, command
    figures/                      ap_vs_training_time.png, ap_vs_latency.png, ap_by_size.png
    evaluation/                   evaluate.py's full report, every detector a column
    runs/                         the training runs (unless --storage)
--record PREFIX writes PREFIX.json, PREFIX.md and PREFIX_figures/ as well (benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from detr_ray.config import ARCHS, ConfigError, apply_overrides, experiment_from_dict, load_yaml
from detr_ray.data.storage import join
from detr_ray.ownership import NotOwnedError, claim

OWNER = "detr_ray.benchmark_detectors"
DEFAULT_ARCHS = ("detr", "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn")
ROWS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "mean_iou")
log = logging.getLogger("benchmark_detectors")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--archs",
        nargs="+",
        default=list(DEFAULT_ARCHS),
        choices=ARCHS,
        metavar="ARCH",
        help=f"default: {' '.join(DEFAULT_ARCHS)}",
    )
    p.add_argument("--config", help="experiment YAML shared by every arch (default: the demo experiment)")
    p.add_argument("--data", help="directory or URI with train/ and val/ shards (default: the demo data)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="0: whole epochs")
    p.add_argument("--batch-size", type=int, help="per worker (default: the experiment's)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting of every run"
    )
    p.add_argument("--latency-images", type=int, default=20, help="val images timed at batch 1 per detector")
    p.add_argument("--out", default="runs/detector-benchmark", help="report directory")
    p.add_argument("--storage", help="where the training runs go (default: OUT/runs)")
    p.add_argument("--record", metavar="PREFIX", help="also write PREFIX.json, PREFIX.md, PREFIX_figures/")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (no RAY_ADDRESS)")
    return p.parse_args(argv)


def _experiment(args, arch: str):
    from detr_ray.train.trainer import demo_experiment

    raw = load_yaml(args.config) if args.config else demo_experiment()
    raw = {k: dict(v or {}) for k, v in raw.items()}
    raw.setdefault("model", {})["arch"] = arch
    if args.data:
        raw.setdefault("data", {}).update(train=join(args.data, "train"), val=join(args.data, "val"))
    if args.batch_size:
        raw.setdefault("data", {})["batch_size"] = args.batch_size
    raw.setdefault("train", {}).update(
        epochs=args.epochs,
        eval_every=args.epochs,
        max_steps_per_epoch=args.max_steps_per_epoch,
        num_workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        tensorboard=False,
        max_failures=0,
        keep_checkpoints=args.epochs,  # every epoch's metrics stay readable (Result.metrics_dataframe)
    )
    return experiment_from_dict(apply_overrides(raw, args.set), args.config or "demo experiment")


def machine() -> dict:
    import torch
    import torchvision

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
    }


def train_all(args, storage: str) -> list[dict]:
    from detr_ray.checkpoint import best_checkpoint
    from detr_ray.train.trainer import build_trainer

    runs = []
    for arch in args.archs:
        exp = _experiment(args, arch)
        if os.path.exists(os.path.join(storage, arch)):
            raise ConfigError(
                f"{storage}/{arch}: a run of that name exists; its training time would not be this benchmark's "
                "(choose a new --out or --storage)"
            )
        log.info("training %s for %d epochs", arch, args.epochs)
        start = time.perf_counter()
        result = build_trainer(exp, name=arch, storage_path=storage).fit()
        wall = time.perf_counter() - start
        if result.error:
            raise RuntimeError(f"{arch}: training failed: {result.error}")
        records = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        history = list({int(h["epoch"]): h for h in records}.values())
        checkpoint, value = best_checkpoint(result.path, "val/AP", "max")
        if checkpoint is None:
            raise RuntimeError(f"{arch}: no verified checkpoint with val/AP in {result.path}")
        runs.append(
            {
                "arch": arch,
                "run": result.path,
                "checkpoint": checkpoint,
                "val_AP_in_training": value,
                "training_s": sum(
                    float(h.get("train/epoch_time_s", 0.0)) for h in history
                ),  # the epochs' training steps only
                "wall_s": wall,  # the whole fit(): Ray Train start-up, data, validation, checkpoints
                "steps": int(result.metrics.get("global_step", 0)),
                "images": int(sum(h.get("train/steps", 0) for h in history))
                * exp.data.batch_size
                * exp.train.num_workers,
                "train_images_per_s": sum(float(h.get("train/images_per_s", 0.0)) for h in history)
                / max(len(history), 1),
                "final_train_loss": result.metrics.get("train/loss"),
                "experiment": exp.to_dict(),
            }
        )
    return runs


def evaluate_all(runs: list[dict], out: Path, args):
    from detr_ray.evaluation.end_to_end import EvaluationOptions, run_evaluation
    from detr_ray.evaluation.inference import InferenceConfig
    from detr_ray.evaluation.subject import from_checkpoint

    work = out / "evaluation-work"
    subjects = [from_checkpoint(r["checkpoint"], str(work), name=r["arch"]) for r in runs]
    options = EvaluationOptions(
        out=out / "evaluation", inference=InferenceConfig(progress=False), latency_images=args.latency_images
    )
    report, paths = run_evaluation(subjects[0], options, subjects[1:])
    rows = [
        {
            "name": report.title,
            "metrics": report.metrics,
            "tide": _tide(report.analysis.tide),
            "efficiency": report.efficiency,
        }
    ]
    rows += [
        {"name": o["name"], "metrics": o["metrics"], "tide": o["tide"], "efficiency": o["efficiency"]}
        for o in report.comparison
    ]
    for run, row in zip(runs, rows):
        row.update({k: v for k, v in run.items() if k != "experiment"})
    return rows, report, paths


def _tide(t) -> dict:
    return {
        **{k: v["dAP"] for k, v in t.errors.items()},
        "false_positives": t.false_positives_dap,
        "false_negatives": t.false_negatives_dap,
    }


# --------------------------------------------------------------------------------------------
# Figures and the report


def figures(rows: list[dict], directory: Path) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.savefig(directory / f"{name}.png", dpi=110, bbox_inches="tight")
        out[name] = directory / f"{name}.png"

    for name, x_of, xlabel in (
        ("ap_vs_training_time", lambda r: r["training_s"], "training time (s, training steps of all epochs)"),
        ("ap_vs_latency", lambda r: r["efficiency"]["latency_ms"]["p50"], "inference latency, batch 1, p50 (ms)"),
    ):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for i, r in enumerate(rows):
            x = x_of(r)
            ax.scatter([x], [r["metrics"]["AP"]], color=f"C{i}", s=40)
            if name == "ap_vs_latency":
                ax.plot([x, r["efficiency"]["latency_ms"]["p90"]], [r["metrics"]["AP"]] * 2, color=f"C{i}", lw=1)
            ax.annotate(r["name"], (x, r["metrics"]["AP"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set(
            xlabel=xlabel,
            ylabel="AP @ IoU .50:.95",
            title=name.replace("_", " ") + (" (line: to p90)" if name == "ap_vs_latency" else ""),
        )
        ax.grid(alpha=0.3)
        save(fig, name)

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    keys = ("AP", "APs", "APm", "APl")
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        values = [max(r["metrics"][k], 0.0) for k in keys]  # -1 (no boxes of that size) drawn as 0
        ax.bar([j + i * width for j in range(len(keys))], values, width, label=r["name"], color=f"C{i}")
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], keys)
    ax.set(ylabel="AP", title="AP by object size")
    ax.legend(fontsize=7)
    save(fig, "ap_by_size")
    return out


def _fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if v == -1 else f"{v:.{digits}f}"
    return str(v)


def markdown(summary: dict, figure_dir: str) -> str:
    rows = summary["rows"]
    b = summary["budget"]
    lines = [
        f"# Detector benchmark: {', '.join(r['name'] for r in rows)}",
        "",
        f"Command: `{summary['command']}`  ",
        f"Date: {summary['date']}  ",
        f"Machine: {summary['machine']['cpu']}, {summary['machine']['cpu_cores']} cores, "
        f"GPU: {summary['machine']['gpu'] or 'none'}; "
        f"torch {summary['machine']['torch']}, torchvision {summary['machine']['torchvision']}  ",
        f"Data: train `{summary['data']['train']}`, val `{summary['data']['val']}` "
        f"({summary['data']['val_images']} images)  ",
        f"Budget, the same for every detector: {b['epochs']} epochs x {b['max_steps_per_epoch'] or 'all'} steps, "
        f"batch {b['batch_size']} x {b['workers']} worker(s) ({rows[0]['images']} training images seen); "
        f"AdamW lr {b['lr']}, lr_backbone {b['lr_backbone']}, "
        f"weight decay {b['weight_decay']}, clip {b['clip_max_norm']}; validation at the last epoch.",
        "",
        "| | " + " | ".join(r["name"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]

    def line(label, get, digits=3):
        lines.append(f"| {label} | " + " | ".join(_fmt(get(r), digits) for r in rows) + " |")

    for key in ROWS:
        line(key, lambda r, key=key: r["metrics"][key])
    for key in ("classification", "localization", "both", "duplicate", "background", "missed"):
        line(f"TIDE dAP50 {key}", lambda r, key=key: r["tide"].get(key))
    line("parameters (M)", lambda r: r["efficiency"]["parameters"] / 1e6, 2)
    line("GFLOPs at the val resolution", lambda r: r["efficiency"]["gflops"], 2)
    line("latency batch 1 p50 (ms)", lambda r: r["efficiency"]["latency_ms"]["p50"], 1)
    line("latency batch 1 p90 (ms)", lambda r: r["efficiency"]["latency_ms"]["p90"], 1)
    line("training images/s", lambda r: r["train_images_per_s"], 2)
    line("training time (s)", lambda r: r["training_s"], 1)
    line("fit() wall time (s)", lambda r: r["wall_s"], 1)
    line("final training loss", lambda r: r["final_train_loss"])
    lines += [
        "",
        "Latency and GFLOPs: one val image at a time after the val transform, measured in this run on "
        f"{rows[0]['efficiency']['device']} ({rows[0]['efficiency']['threads']} threads). "
        "Training time: the training steps "
        "of all epochs (no start-up, validation or checkpointing); fit() wall time includes them. The training losses "
        "are each model's own objective and are not comparable across architectures.",
        "",
    ]
    for name, caption in (
        ("ap_vs_training_time", "AP vs training time"),
        ("ap_vs_latency", "AP vs latency"),
        ("ap_by_size", "AP by object size"),
    ):
        lines += [f"![{caption}]({figure_dir}/{name}.png)", ""]
    lines += [
        "The full evaluation (per category, TIDE, COCO breakdown, PR curves, worst images) of every detector is "
        "`evaluation/report.md` in the benchmark's output directory.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        experiments = [_experiment(args, arch) for arch in args.archs]  # every config error before anything runs
        out = claim(args.out, OWNER)
    except (ConfigError, NotOwnedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    storage = os.path.abspath(args.storage or str(out / "runs"))

    import ray

    from detr_ray.data.datasets import resolve_shards
    from detr_ray.data.shards import read_meta

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else args.num_cpus, log_to_driver=False)
    try:
        runs = train_all(args, storage)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, report, paths = evaluate_all(runs, out, args)
    train_uri, val_uri = resolve_shards(experiments[0].data)
    t = experiments[0].train
    summary = {
        "command": shlex.join(["python", "scripts/benchmark_detectors.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "data": {"train": train_uri, "val": val_uri, "val_images": sum(s["rows"] for s in read_meta(val_uri).shards)},
        "budget": {
            "epochs": t.epochs,
            "max_steps_per_epoch": t.max_steps_per_epoch,
            "batch_size": experiments[0].data.batch_size,
            "workers": t.num_workers,
            "lr": t.lr,
            "lr_backbone": t.lr_backbone,
            "weight_decay": t.weight_decay,
            "clip_max_norm": t.clip_max_norm,
        },
        "rows": rows,
        "evaluation_report": str(paths["report.md"]),
    }
    drawn = figures(rows, out / "figures")
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "report.md").write_text(markdown(summary, "figures"))
    if args.record:
        prefix = Path(args.record)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        figure_dir = prefix.parent / f"{prefix.name}_figures"
        figure_dir.mkdir(exist_ok=True)
        for path in drawn.values():
            shutil.copyfile(path, figure_dir / path.name)
        prefix.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
        prefix.with_suffix(".md").write_text(markdown(summary, figure_dir.name))
    print(f"\n{'':14s}" + "".join(f"{r['name']:>30s}" for r in rows))
    for key, get in (
        ("AP", lambda r: r["metrics"]["AP"]),
        ("AP50", lambda r: r["metrics"]["AP50"]),
        ("train s", lambda r: r["training_s"]),
        ("latency p50", lambda r: r["efficiency"]["latency_ms"]["p50"]),
    ):
        print(f"{key:14s}" + "".join(f"{get(r):30.3f}" for r in rows))
    print(f"\nreport: {out / 'report.md'}\nfull evaluation: {paths['report.md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
