"""The evaluation report: `report.json`, `report.md` and PNG figures in one directory, readable on
their own (the Markdown links the figures by relative path).

    report.json     everything below as data (metrics, per-category rows, curves, analysis, ...)
    report.md       metrics (with --compare columns), AP per IoU threshold, per-category table,
                    error analysis (TIDE, COCO breakdown, IoU of true positives, worst images),
                    the run's configuration and training curves, and for a sweep all trials and
                    Optuna's parameter importances
    figures/        pr_overall.png, pr_worst_categories.png, coco_breakdown.png, tide.png,
                    tp_iou.png, training.png, worst_false_positives.png, worst_false_negatives.png;
                    for a sweep sweep_history.png, sweep_parallel.png, sweep_curves.png,
                    sweep_importances.png, sweep_front.png (sweep_report.py)

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend).

The module is long because the three renderings of a report (JSON, Markdown, figures) are kept
side by side, one small function per section or figure: a section added or changed is changed
in all three in one place.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from detr_ray.coco_eval import METRIC_NAMES
from detr_ray.evaluation import sweep_report
from detr_ray.evaluation.analysis import ERROR_TYPES, REC_THRS, STAGES, Analysis

log = logging.getLogger(__name__)

FIGURES = "figures"
METRIC_ROWS = (*METRIC_NAMES, "mean_iou")
METRIC_HELP = {
    "AP": "AP @ IoU .50:.95",
    "AP50": "AP @ IoU .50",
    "AP75": "AP @ IoU .75",
    "APs": "AP small",
    "APm": "AP medium",
    "APl": "AP large",
    "AR1": "AR, 1 detection",
    "AR10": "AR, 10 detections",
    "AR100": "AR, 100 detections",
    "ARs": "AR small",
    "ARm": "AR medium",
    "ARl": "AR large",
    "mean_iou": "mean IoU of true positives @ .50",
}
HISTORY_CURVES = (("train/loss", "train loss"), ("val/AP", "val AP"), ("val/AP50", "val AP50"))


@dataclass
class Report:
    """Everything the report shows. `comparison` rows: {"name", "kind", "source", "metrics",
    "per_category": {category id: AP}, "tide": {error type: dAP}}."""

    title: str
    subject: dict
    data: dict
    metrics: dict[str, float]
    ap_per_iou: dict[str, float]
    per_category: list[dict]
    analysis: Analysis
    inference: dict | None = None
    files: dict = field(default_factory=dict)
    config: dict | None = None
    hyperparameters: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    importances: dict | str | None = None
    sweep: dict | None = None  # sweep_report.summarize: history, compute, ASHA, Pareto front
    comparison: list[dict] = field(default_factory=list)
    efficiency: dict | None = None  # efficiency.measure of the evaluated checkpoint
    images: dict[int, np.ndarray] = field(default_factory=dict)  # worst images, HWC uint8

    @property
    def category_names(self) -> dict[int, str]:
        return {row["id"]: row["name"] for row in self.per_category}


def to_json(report: Report, figures: dict[str, str] | None = None) -> dict:
    return {
        "title": report.title,
        "subject": report.subject,
        "data": report.data,
        "inference": report.inference,
        "files": report.files,
        "metrics": report.metrics,
        "ap_per_iou": report.ap_per_iou,
        "per_category": report.per_category,
        "analysis": report.analysis.to_json(),
        "config": report.config,
        "hyperparameters": report.hyperparameters,
        "history": report.history,
        "trials": report.trials,
        "importances": report.importances,
        "sweep": report.sweep,
        "comparison": report.comparison,
        "efficiency": report.efficiency,
        "figures": figures or {},
    }


def _jsonable(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Writes report.json, report.md and figures/*.png; returns {name: path} of everything."""
    out = Path(out_dir)
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    figures = _draw_figures(report, out / FIGURES)
    rel = {name: f"{FIGURES}/{path.name}" for name, path in figures.items()}
    (out / "report.json").write_text(json.dumps(to_json(report, rel), indent=1, default=_jsonable))
    (out / "report.md").write_text(_markdown(report, rel))
    log.info("report written to %s", out)
    return {"report.json": out / "report.json", "report.md": out / "report.md", **figures}


# --------------------------------------------------------------------------------------------
# Figures


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _draw_figures(r: Report, out: Path) -> dict[str, Path]:
    a = r.analysis
    figures = {
        "pr_overall": _save(_pr_overall(a), out / "pr_overall.png"),
        "coco_breakdown": _save(_breakdown(a), out / "coco_breakdown.png"),
        "tide": _save(_tide(a), out / "tide.png"),
        "tp_iou": _save(_tp_iou(a), out / "tp_iou.png"),
    }
    if a.pr.worst:
        figures["pr_worst_categories"] = _save(_pr_worst(a), out / "pr_worst_categories.png")
    if any(any(k in h for k, _ in HISTORY_CURVES) for h in r.history):
        figures["training"] = _save(_training(r.history), out / "training.png")
    if r.sweep:
        figures.update(
            sweep_report.save_figures(r.sweep, r.trials, r.sweep.get("search") or {}, r.importances, out, _save)
        )
    for key, title in (("false_positives", "most false positives"), ("false_negatives", "most missed boxes")):
        entries = getattr(a.worst, key)
        if entries:
            figures[f"worst_{key}"] = _save(
                _worst(entries, r.images, r.category_names, title, a.worst.score_threshold), out / f"worst_{key}.png"
            )
    return figures


def _pr_overall(a: Analysis) -> Figure:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for i, t in enumerate(a.pr.iou_thrs):
        curve = a.pr.overall[i]
        ax.plot(
            REC_THRS,
            curve,
            color=(0.1 + 0.8 * i / 9, 0.2, 0.9 - 0.8 * i / 9),
            label=f"IoU {t:.2f}  AP {curve.mean():.3f}",
        )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall, all categories")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def _pr_worst(a: Analysis) -> Figure:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for i, c in enumerate(a.pr.worst):
        colour = f"C{i % 10}"
        ax.plot(REC_THRS, c["curve50"], color=colour, label=f"{c['name']} (AP {c['AP']:.3f}) IoU .50")
        ax.plot(REC_THRS, c["curve75"], color=colour, linestyle="--", label=f"{c['name']} IoU .75")
    ax.set(
        xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall, lowest-AP categories"
    )
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def _breakdown(a: Analysis) -> Figure:
    """COCO analyze() style: the areas between successive stage curves, stacked."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    colours = ["#1f3b73", "#3f6fb5", "#7fb2e5", "#9bd4a5", "#f0d264", "#e88b4c", "#c43c3c"]  # one per stage
    below = np.zeros(len(REC_THRS))
    b = a.breakdown
    for colour, s in zip(colours, STAGES):
        curve = np.maximum(b.curves[s], below)
        ax.fill_between(REC_THRS, below, curve, color=colour, label=f"[{b.ap[s]:.3f}] {s}")
        below = curve
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1), title="COCO analysis: overall")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _tide(a: Analysis) -> Figure:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    errors = a.tide.errors
    daps = [errors[t]["dAP"] * 100 for t in ERROR_TYPES]
    bars = ax.barh(list(ERROR_TYPES)[::-1], daps[::-1], color=["C0", "C1", "C2", "C3", "C4", "C5"][::-1])
    for bar, t in zip(bars, list(ERROR_TYPES)[::-1]):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {errors[t]['dAP'] * 100:.2f} ({errors[t]['count']})",
            va="center",
            fontsize=8,
        )
    ax.set(
        xlabel="dAP50 (points of AP gained by fixing only this error; count in brackets)",
        title=f"TIDE errors (AP50 {a.tide.base_ap50 * 100:.2f})",
    )
    ax.set_xlim(0, max(daps + [0.01]) * 1.35)
    return fig


def _tp_iou(a: Analysis) -> Figure:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.hist(a.tp_iou.ious, bins=a.tp_iou.edges, color="C2", edgecolor="white")
    mean = f", mean {a.tp_iou.ious.mean():.3f}" if len(a.tp_iou.ious) else ""
    ax.set(
        xlabel="IoU with the matched box",
        ylabel="true positives",
        title=f"IoU of true positives at IoU .50 ({len(a.tp_iou.ious)}{mean})",
    )
    return fig


def _training(history: list[dict]) -> Figure:
    fig = Figure(figsize=(10, 3.6))
    loss_ax, ap_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ax, keys in ((loss_ax, ("train/loss",)), (ap_ax, ("val/AP", "val/AP50"))):
        for key in keys:
            points = [(h["epoch"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and h[key] > -1]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
        ax.set(xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    loss_ax.set(title="training loss")
    ap_ax.set(title="validation AP")
    return fig


def _worst(
    entries: list[dict], images: dict[int, np.ndarray], names: dict[int, str], title: str, threshold: float
) -> Figure:
    cols = min(3, len(entries))
    rows = math.ceil(len(entries) / cols)
    fig = Figure(figsize=(4 * cols, 3.6 * rows))
    fig.suptitle(
        f"Images with the {title} (detections with score >= {threshold:g}; green: true positive, red: false "
        "positive, white dashed: found box, yellow: missed box)",
        fontsize=8,
    )
    for i, e in enumerate(entries):
        ax = fig.add_subplot(rows, cols, i + 1)
        pixels = images.get(e["image_id"])
        if pixels is not None:
            ax.imshow(pixels)
            height, width = pixels.shape[:2]
        else:  # not available: boxes on grey
            ax.set_facecolor("#333333")
            boxes = [b["bbox"] for b in e["ground_truth"] + e["detections"]]
            width = e.get("width") or max((x + w for x, _, w, _ in boxes), default=1)
            height = e.get("height") or max((y + h for _, y, _, h in boxes), default=1)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        for g in e["ground_truth"]:
            x, y, w, h = g["bbox"]
            found = g["matched"] or g["crowd"]
            ax.add_patch(
                Rectangle(
                    (x, y),
                    w,
                    h,
                    fill=False,
                    lw=1.2 if found else 2.2,
                    ls="--" if found else "-",
                    ec="white" if found else "yellow",
                )
            )
            if not found:
                ax.text(
                    x,
                    y + h,
                    names.get(g["category_id"], str(g["category_id"])),
                    color="black",
                    fontsize=6,
                    va="top",
                    backgroundcolor="yellow",
                    clip_on=True,
                )
        for d in e["detections"]:
            x, y, w, h = d["bbox"]
            colour = "lime" if d["tp"] else "red"
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.2, ec=colour))
            ax.text(
                x,
                y,
                f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}",
                color="white",
                fontsize=6,
                va="bottom",
                backgroundcolor=colour,
                clip_on=True,
            )
        ax.set_title(
            f"image {e['image_id']} {e['file_name']}\n{e['false_positives']} FP, {e['false_negatives']} missed",
            fontsize=7,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


# --------------------------------------------------------------------------------------------
# Markdown


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if v == -1:
        return "n/a"
    return f"{v:.{digits}f}" if abs(v) >= 10 ** (-digits) or v == 0 else f"{v:.2e}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_num(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return lines + [""]


def _figure(rel: dict[str, str], name: str, caption: str) -> list[str]:
    return [f"![{caption}]({rel[name]})", ""] if name in rel else []


def _markdown(r: Report, rel: dict[str, str]) -> str:
    lines = [f"# Evaluation: {r.title}", ""]
    for section in (_md_subject, _md_metrics, _md_per_category, _md_errors, _md_training, _md_trials):
        lines += section(r, rel)
    if r.sweep:
        lines += sweep_report.markdown(r.sweep, rel, _table, _figure, _num)
    return "\n".join(lines)


def _md_subject(r: Report, rel: dict[str, str]) -> list[str]:
    """What was evaluated, on which data, with which inference run."""
    s = r.subject
    lines: list[str] = []
    lines += ["| | |", "|---|---|"]
    for label, value in (
        ("evaluated", f"{s.get('kind')} `{s.get('source')}`"),
        ("checkpoint", f"`{s['checkpoint']}`" if s.get("checkpoint") else None),
        (
            "weights",
            f"sha256 `{s['weights']['sha256']}`; {s['weights']['load']['summary']}" if s.get("weights") else None,
        ),
        ("trial", s.get("trial")),
        (
            f"{s.get('metric')} recorded in training",
            _num(s.get("best_value")) if s.get("best_value") is not None else None,
        ),
        ("validation data", f"`{r.data.get('val')}`"),
        (
            "images / boxes / categories",
            f"{r.data.get('images')} / {r.data.get('annotations')} / {r.data.get('categories')}",
        ),
    ):
        if value is not None:
            lines.append(f"| {label} | {value} |")
    if r.inference:
        inf = r.inference
        lines.append(
            f"| inference | {inf['images']} images in {inf['seconds']:.1f} s ({inf['images_per_s']:.1f} images/s), "
            f"{inf['actors']} {inf['device']} actor(s), {inf['detections']} detections, "
            f"{len(inf['skipped_images'])} undecodable |"
        )
    for label, name in (("detections (COCO results)", "results"), ("ground truth (COCO)", "ground_truth")):
        if r.files.get(name):
            lines.append(f"| {label} | `{r.files[name]}` |")
    lines.append("")
    return lines


def _md_metrics(r: Report, rel: dict[str, str]) -> list[str]:
    """COCO metrics, next to the compared detectors', the cost, and AP per IoU."""
    others = r.comparison
    lines: list[str] = []
    lines += ["## Metrics", "", "COCO bbox metrics from pycocotools (-1, shown n/a: no ground truth of that size)."]
    if others:
        lines.append(
            "Other detectors evaluated on the same images: "
            + ", ".join(f"**{o['name']}** ({o['kind']} `{o['source']}`)" for o in others)
            + "."
        )
    lines.append("")
    header = ["metric", "", r.title] + [o["name"] for o in others]
    lines += _table(
        header, [[m, METRIC_HELP[m], r.metrics.get(m)] + [o["metrics"].get(m) for o in others] for m in METRIC_ROWS]
    )

    lines += _cost(r)

    lines += ["### AP at each IoU threshold", ""]
    lines += _table(["IoU", "AP"], [[k, v] for k, v in r.ap_per_iou.items()])
    lines += _figure(rel, "pr_overall", "precision-recall per IoU threshold")
    return lines


def _md_per_category(r: Report, rel: dict[str, str]) -> list[str]:
    """Per-category metrics."""
    others = r.comparison
    lines: list[str] = []
    lines += ["## Per category", ""]
    header = ["id", "category", "supercategory", "boxes", "detections", "AP", "AP50", "AP75", "AR100"] + [
        f"AP {o['name']}" for o in others
    ]
    lines += _table(
        header,
        [
            [
                str(c["id"]),
                c["name"],
                c["supercategory"],
                c["gt"],
                c["detections"],
                c["AP"],
                c["AP50"],
                c["AP75"],
                c["AR100"],
            ]
            + [o["per_category"].get(c["id"], o["per_category"].get(str(c["id"]))) for o in others]
            for c in r.per_category
        ],
    )
    lines += _figure(rel, "pr_worst_categories", "precision-recall of the lowest-AP categories")
    return lines


def _md_errors(r: Report, rel: dict[str, str]) -> list[str]:
    """TIDE error types, the COCO analysis, true-positive IoU and the worst images."""
    a, others = r.analysis, r.comparison
    lines: list[str] = []
    t = a.tide
    lines += [
        "## Error analysis",
        "",
        "### TIDE error types",
        "",
        f"TIDE (Bolya et al., 2020) at foreground IoU 0.5 and background IoU 0.1, AP50 {_num(t.base_ap50)}. "
        "dAP: the AP50 gained when only that error type is fixed. Every false positive has exactly one type; "
        "a ground-truth box is matched, covered by a classification/localization error, or missed.",
        "",
    ]
    header = ["error", "count", "dAP50"] + [f"dAP50 {o['name']}" for o in others]
    lines += _table(
        header,
        [
            [e, t.errors[e]["count"], t.errors[e]["dAP"]] + [o.get("tide", {}).get(e) for o in others]
            for e in ERROR_TYPES
        ]
        + [
            ["all false positives", "", t.false_positives_dap]
            + [o.get("tide", {}).get("false_positives") for o in others],
            ["all false negatives", "", t.false_negatives_dap]
            + [o.get("tide", {}).get("false_negatives") for o in others],
        ],
    )
    tally = t.to_json()
    lines += [
        "Detections: " + ", ".join(f"{k} {v}" for k, v in sorted(tally["detections"].items())) + ". "
        "Ground-truth boxes: " + ", ".join(f"{k} {v}" for k, v in sorted(tally["ground_truth"].items())) + ".",
        "",
    ]
    lines += _figure(rel, "tide", "TIDE dAP per error type")

    lines += [
        "### COCO analysis (PR curves as errors are forgiven)",
        "",
        "C75/C50: PR at IoU .75/.50; Loc: at IoU .10 (localization errors forgiven); Sim: confusions within a "
        "supercategory forgiven; Oth: all class confusions forgiven; BG: background false positives removed; "
        "FN: every remaining miss forgiven.",
        "",
    ]
    lines += _table(["stage", "AP"], [[s_, a.breakdown.ap[s_]] for s_ in STAGES])
    lines += _figure(rel, "coco_breakdown", "COCO analysis, stacked PR curves")

    iou = a.tp_iou.to_json()
    lines += [
        "### IoU of true positives",
        "",
        f"{iou['count']} true positives at IoU .50 (all areas, 100 detections)"
        + (
            f"; mean {iou['mean']:.3f}, quartiles {iou['quantiles']['p25']:.3f} / {iou['quantiles']['median']:.3f} / "
            f"{iou['quantiles']['p75']:.3f}."
            if iou["count"]
            else "."
        ),
        "",
    ]
    lines += _table(
        ["IoU", "true positives"],
        [
            [f"{lo:.2f}-{hi:.2f}", n]
            for lo, hi, n in zip(iou["histogram"]["edges"], iou["histogram"]["edges"][1:], iou["histogram"]["counts"])
        ],
    )
    lines += _figure(rel, "tp_iou", "IoU of true positives")

    w = a.worst
    lines += [
        "### Images with the most errors",
        "",
        f"Detections with score >= {w.score_threshold:g}, matched at IoU .50.",
        "",
    ]
    lines += _table(
        ["", "image", "file", "false positives", "missed"],
        [
            [kind, str(e["image_id"]), e["file_name"], e["false_positives"], e["false_negatives"]]
            for kind, entries in (("most FP", w.false_positives), ("most missed", w.false_negatives))
            for e in entries
        ],
    )
    lines += _figure(rel, "worst_false_positives", "images with the most false positives")
    lines += _figure(rel, "worst_false_negatives", "images with the most missed boxes")
    return lines


def _md_training(r: Report, rel: dict[str, str]) -> list[str]:
    """The trial's hyperparameters, training history and configuration."""
    lines: list[str] = []
    lines += ["## Training", ""]
    if r.hyperparameters:
        lines += ["Tuned hyperparameters of this trial:", ""] + _table(
            ["parameter", "value"], [[k, _plain(v)] for k, v in r.hyperparameters.items()]
        )
    lines += _figure(rel, "training", "training loss and validation AP by epoch")
    if r.history:
        keys = [k for k, _ in HISTORY_CURVES if any(k in h for h in r.history)]
        lines += _table(["epoch"] + keys, [[str(h["epoch"])] + [h.get(k) for k in keys] for h in r.history])
    else:
        lines += ["No training history was found for this checkpoint.", ""]
    if r.config:
        lines += [
            "<details><summary>Full configuration</summary>",
            "",
            "```json",
            json.dumps(r.config, indent=1, default=_jsonable),
            "```",
            "",
            "</details>",
            "",
        ]
    return lines


def _md_trials(r: Report, rel: dict[str, str]) -> list[str]:
    """The sweep's trials and Optuna's parameter importances."""
    s = r.subject
    lines: list[str] = []
    if r.trials:
        lines += ["## Trials", ""]
        params = sorted({k for tr in r.trials for k in (tr.get("config") or {})})
        rows = sorted(
            r.trials,
            key=lambda tr: (
                not isinstance(tr.get("best"), (int, float)),
                -(tr.get("best") or 0) if s.get("mode", "max") == "max" else (tr.get("best") or 0),
            ),
        )
        lines += _table(
            ["trial", "status", "epochs", f"best {s.get('metric')}"] + params,
            [
                [
                    str(tr["trial"]) + (" (evaluated)" if str(tr["trial"]) == str(s.get("trial")) else ""),
                    str(tr.get("status", "")),
                    tr.get("epochs"),
                    tr.get("best"),
                ]
                + [_plain((tr.get("config") or {}).get(p)) for p in params]
                for tr in rows
            ],
        )
        lines += ["### Parameter importances (Optuna)", ""]
        if isinstance(r.importances, dict):
            lines += _table(["parameter", "importance"], [[k, v] for k, v in r.importances.items()])
        else:
            lines += [str(r.importances), ""]
    return lines


def _cost(r: Report) -> list[str]:
    """The cost table: one column per checkpoint measured in this run (efficiency.py)."""
    columns = [(r.title, r.efficiency)] + [(o["name"], o.get("efficiency")) for o in r.comparison]
    if not any(e for _, e in columns):
        return []
    first = next(e for _, e in columns if e)

    def row(label, get):
        return [label] + [get(e) if e else "" for _, e in columns]

    lines = [
        "### Cost",
        "",
        f"Measured in this run on {first['device']} ({first['threads']} threads), one val image at a time "
        "after the val transform; training images/s as the run recorded it (its last epoch, all workers).",
        "",
    ]
    return lines + _table(
        ["", *(name for name, _ in columns)],
        [
            row("architecture", lambda e: e["arch"]),
            row("parameters (M)", lambda e: e["parameters"] / 1e6),
            row("GFLOPs (val resolution)", lambda e: e["gflops"]),
            row("val resolution (mean h x w)", lambda e: f"{e['resolution'][0]:.0f} x {e['resolution'][1]:.0f}"),
            row("latency p50, batch 1 (ms)", lambda e: e["latency_ms"]["p50"]),
            row("latency p90, batch 1 (ms)", lambda e: e["latency_ms"]["p90"]),
            row("training images/s", lambda e: e["train_images_per_s"]),
        ],
    )


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
