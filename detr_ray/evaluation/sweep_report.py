"""The sweep part of an experiment's evaluation report, from its trials.json: what the search
found and what it cost.

    optimisation history   each trial's best value in the order Tune created the trials, and the best so far
    parallel coordinates   every trial's parameters and objectives on one line, coloured by the primary metric
    learning curves        every trial's metric by epoch, ASHA's rungs marked: where it kept a trial going,
                           where it stopped one
    parameter importances  Optuna's (training_history.parameter_importances), as a bar chart
    compute                trial-epochs and device-hours spent against a full-budget grid of the same trials
                           (each trial run to the sweep's epochs, at its own measured time per epoch)
    Pareto front           several objectives: the front, which member was evaluated and by which rule

Figures use matplotlib's object API on the Agg canvas, like report.py (Optuna's own matplotlib
plots draw through pyplot's global state).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

STOPPED = "stopped early (ASHA)"
STATUS_COLOURS = {"completed": "C0", STOPPED: "C1", "error": "C3"}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summarize(subject) -> dict | None:
    """The sweep section's data (JSON-able), None when the subject is not a sweep."""
    trials = [t for t in subject.trials if t.get("trial")]  # trials.json lists them in the order Tune created them
    if not trials:
        return None
    sweep = subject.sweep or {}
    metric, mode = subject.metric, subject.mode
    epochs = int(sweep.get("epochs") or max((t.get("epochs") or 0) for t in trials))
    better = max if mode == "max" else min
    history, best_so_far = [], None
    for i, t in enumerate(trials):
        value = _number(t.get("best"))
        if value is not None:
            best_so_far = value if best_so_far is None else better(best_so_far, value)
        history.append(
            {"index": i, "trial": t["trial"], "status": t.get("status"), "value": value, "best_so_far": best_so_far}
        )
    return {
        "metric": metric,
        "mode": mode,
        "objectives": sweep.get("objectives") or {metric: mode},
        "epochs": epochs,
        "history": history,
        "compute": compute(trials, epochs, sweep.get("resources") or {}),
        "asha": sweep.get("asha"),
        "study": sweep.get("study"),
        "warm_start": sweep.get("warm_start"),
        "front": subject.front,
        "choice": subject.choice,
        "evaluated": subject.trial,
        "search": subject.search,
    }


def compute(trials: list[dict], epochs: int, resources: dict) -> dict:
    """Trial-epochs and hours spent, against every trial run to `epochs` at its own measured
    seconds per epoch (the Tune wall time of its last result, over the epochs it ran)."""
    spent_epochs = sum(int(t.get("epochs") or 0) for t in trials)
    seconds, projected, timed = 0.0, 0.0, 0
    for t in trials:
        ran = int(t.get("epochs") or 0)
        times = [h.get("time_total_s") for h in t.get("history") or [] if _number(h.get("time_total_s")) is not None]
        if not ran or not times:
            continue
        timed += 1
        seconds += max(times)
        projected += max(times) / ran * epochs
    gpus = float(resources.get("gpus_per_trial") or 0.0)
    device, per_trial = ("GPU", gpus) if gpus else ("CPU", float(resources.get("cpus_per_trial") or 0.0))
    return {
        "trials": len(trials),
        "trial_epochs": spent_epochs,
        "grid_trial_epochs": len(trials) * epochs,
        "trials_timed": timed,
        "trial_hours": seconds / 3600,
        "grid_trial_hours": projected / 3600,
        "device": device,
        "device_per_trial": per_trial,
        f"{device.lower()}_hours": seconds / 3600 * per_trial,
        f"grid_{device.lower()}_hours": projected / 3600 * per_trial,
    }


# --------------------------------------------------------------------------------------------
# Figures


def figures(data: dict, trials: list[dict], search: dict, importances: Any) -> dict[str, Figure]:
    out = {"sweep_history": _history(data), "sweep_curves": _curves(data, trials)}
    params = [k for k, spec in search.items() if isinstance(spec, dict) and next(iter(spec), None) != "fixed"]
    if params:
        out["sweep_parallel"] = _parallel(data, trials, params, search)
    if isinstance(importances, dict) and importances:
        out["sweep_importances"] = _importances(importances)
    if data.get("front") and len(data["objectives"]) >= 2:
        out["sweep_front"] = _front(data, trials)
    return out


def _history(data: dict) -> Figure:
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    for status, colour in STATUS_COLOURS.items():
        points = [(h["index"], h["value"]) for h in data["history"] if h["status"] == status and h["value"] is not None]
        if points:
            ax.scatter(*zip(*points), color=colour, label=status, zorder=3)
    best = [(h["index"], h["best_so_far"]) for h in data["history"] if h["best_so_far"] is not None]
    if best:
        ax.step(*zip(*best), where="post", color="black", lw=1, label="best so far")
    ax.set(
        xlabel="trial (in the order Tune created them)", ylabel=f"best {data['metric']}", title="Optimisation history"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _curves(data: dict, trials: list[dict]) -> Figure:
    """Every trial's metric by epoch; at each ASHA rung a trial reached: o kept, x stopped there."""
    metric = data["metric"]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    asha = data.get("asha") or {}
    milestones = sorted({m for bracket in asha.get("rungs") or [] for m, _ in bracket})
    for m in milestones:
        ax.axvline(m, color="grey", ls=":", lw=0.8)
    kept = stopped = False
    for i, t in enumerate(trials):
        points = [(h["epoch"], h[metric]) for h in t.get("history") or [] if _number(h.get(metric)) is not None]
        if not points:
            continue
        colour = f"C{i % 10}"
        ax.plot(*zip(*points), color=colour, lw=1, alpha=0.8)
        by_epoch = dict(points)
        last = max(by_epoch)
        for m in milestones:
            if m not in by_epoch or m >= asha.get("max_t", math.inf):
                continue
            if t.get("status") == STOPPED and m == last:
                ax.scatter([m], [by_epoch[m]], marker="x", color="red", s=40, zorder=4)
                stopped = True
            elif last > m:
                ax.scatter([m], [by_epoch[m]], marker="o", facecolor="none", edgecolor="green", s=40, zorder=4)
                kept = True
    handles = []
    if kept:
        handles.append(ax.scatter([], [], marker="o", facecolor="none", edgecolor="green", label="ASHA rung: kept"))
    if stopped:
        handles.append(ax.scatter([], [], marker="x", color="red", label="ASHA rung: stopped"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=metric, title=f"Learning curves of {len(trials)} trials (dotted: ASHA rungs)")
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=7)
    return fig


def _axis_value(value: Any, spec: dict) -> float | None:
    """`value` on a 0..1 axis for the parameter's distribution."""
    ((kind, args),) = spec.items()
    if kind == "choice":
        return list(args).index(value) / max(1, len(args) - 1) if value in args else None
    v = _number(value)
    if v is None:
        return None
    lo, hi = float(args[0]), float(args[1])
    if kind == "loguniform":
        v, lo, hi = math.log(v), math.log(lo), math.log(hi)
    return (v - lo) / (hi - lo) if hi > lo else 0.5


def _parallel(data: dict, trials: list[dict], params: list[str], search: dict) -> Figure:
    objectives = list(data["objectives"])
    fig = Figure(figsize=(1.6 * (len(params) + len(objectives)) + 2, 4.2))
    ax = fig.add_subplot()
    values = {
        m: [_number((t.get("values") or {}).get(m, t.get("best") if m == data["metric"] else None)) for t in trials]
        for m in objectives
    }
    ranges = {
        m: (min(v for v in vs if v is not None), max(v for v in vs if v is not None))
        if any(v is not None for v in vs)
        else (0.0, 1.0)
        for m, vs in values.items()
    }
    primary = values[data["metric"]]
    lo, hi = ranges[data["metric"]]
    from matplotlib import colormaps

    colours = colormaps["viridis"]
    for i, t in enumerate(trials):
        ys = [_axis_value((t.get("config") or {}).get(p), search[p]) for p in params]
        for m in objectives:
            v, (a, b) = values[m][i], ranges[m]
            ys.append(None if v is None else ((v - a) / (b - a) if b > a else 0.5))
        xs = [x for x, y in enumerate(ys) if y is not None]
        if len(xs) < 2:
            continue
        shade = 0.0 if primary[i] is None or hi <= lo else (primary[i] - lo) / (hi - lo)
        ax.plot(
            xs,
            [ys[x] for x in xs],
            color=colours(shade if data["mode"] == "max" else 1 - shade),
            lw=1.2,
            ls="-" if t.get("status") == "completed" else "--",
            alpha=0.85,
        )
    labels = params + objectives
    for x, label in enumerate(labels):
        ax.axvline(x, color="black", lw=0.8)
        if label in search:
            ((kind, args),) = search[label].items()
            bottom, top = (str(args[0]), str(args[-1])) if kind == "choice" else (f"{args[0]:.3g}", f"{args[1]:.3g}")
        else:
            bottom, top = (f"{ranges[label][0]:.4g}", f"{ranges[label][1]:.4g}")
        ax.text(x, -0.06, bottom, ha="center", va="top", fontsize=7)
        ax.text(x, 1.04, top, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.tick_params(axis="x", pad=14)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.12)
    ax.set_title(
        f"Parallel coordinates (colour: {data['metric']}, bright = better; dashed: stopped or failed)", fontsize=9
    )
    return fig


def _importances(importances: dict[str, float]) -> Figure:
    fig = Figure(figsize=(6, 0.5 * len(importances) + 1.2))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="C2")
    ax.set(xlabel="importance (Optuna, sums to 1)", title="Parameter importances")
    return fig


def _front(data: dict, trials: list[dict]) -> Figure:
    primary, other = list(data["objectives"])[:2]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    points = [(t["values"].get(other), t["values"].get(primary)) for t in trials if isinstance(t.get("values"), dict)]
    points = [(x, y) for x, y in points if _number(x) is not None and _number(y) is not None]
    if points:
        ax.scatter(*zip(*points), color="lightgrey", label="trials")
    front = sorted((e["values"][other], e["values"][primary]) for e in data["front"])
    ax.plot(*zip(*front), marker="o", color="C3", label="Pareto front")
    chosen = next((e for e in data["front"] if e.get("trial") == data.get("evaluated")), None)
    if chosen:
        ax.scatter(
            [chosen["values"][other]],
            [chosen["values"][primary]],
            marker="*",
            s=200,
            color="gold",
            edgecolor="black",
            zorder=4,
            label="evaluated",
        )
    ax.set(
        xlabel=f"{other} ({data['objectives'][other]})",
        ylabel=f"{primary} ({data['objectives'][primary]})",
        title="Pareto front",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------
# Markdown


def markdown(data: dict, rel: dict[str, str], table, figure, num) -> list[str]:
    """The section's lines; `table`, `figure`, `num` are report.py's helpers."""
    lines = ["## The sweep", ""]
    if data.get("study"):
        lines += [
            f"Optuna study `{data['study']['name']}` in `{data['study']['storage']}`; open it with "
            f"`{data['study']['dashboard']}`.",
            "",
        ]
    warm = data.get("warm_start")
    if warm:
        lines += [
            f"Warm-started from study `{warm['study']}` in `{warm['source']}`: "
            f"{len(warm['used'])} earlier trials used, "
            f"{len(warm['ignored'])} ignored."
        ]
        lines += [f"- trial {w['trial']} ignored: {w['why']}" for w in warm["ignored"]] + [""]
    if data.get("front"):
        objectives = list(data["objectives"])
        lines += [
            "### Pareto front",
            "",
            f"Objectives: {', '.join(f'{m} ({d})' for m, d in data['objectives'].items())}. "
            + (
                f'Evaluated: the member chosen by `--choose "{data["choice"]}"`.'
                if data.get("choice")
                else "Evaluated: its only member."
            ),
            "",
        ]
        lines += table(
            ["trial"] + objectives,
            [
                [str(e.get("trial")) + (" (evaluated)" if e.get("trial") == data.get("evaluated") else "")]
                + [e["values"].get(m) for m in objectives]
                for e in data["front"]
            ],
        )
        lines += figure(rel, "sweep_front", "Pareto front")
    lines += ["### Optimisation history", ""]
    lines += figure(rel, "sweep_history", "optimisation history")
    lines += ["### Parallel coordinates", ""]
    lines += figure(rel, "sweep_parallel", "parallel coordinates")
    lines += ["### Learning curves and ASHA's decisions", ""]
    asha = data.get("asha")
    if asha:
        rungs = sorted({m for bracket in asha.get("rungs") or [] for m, _ in bracket})
        lines += [
            f"ASHA on {asha.get('metric')}: rungs at epochs {', '.join(str(m) for m in rungs)} "
            f"(of {asha.get('max_t')}), "
            f"reduction factor {asha.get('reduction_factor')}; "
            f"it stopped {sum(h['status'] == STOPPED for h in data['history'])} "
            f"of {len(data['history'])} trials before the last epoch.",
            "",
        ]
    else:
        lines += ["No ASHA records in trials.json (no early stopping, or a sweep older than these records).", ""]
    lines += figure(rel, "sweep_curves", "learning curves with ASHA rungs")
    lines += figure(rel, "sweep_importances", "parameter importances")
    c = data["compute"]
    unit = c["device"]
    lines += [
        "### Compute spent",
        "",
        f"Against a full-budget grid of the same {c['trials']} trials, each run to {data['epochs']} epochs "
        f"at its own measured time per epoch ({c['trials_timed']} trials timed; "
        f"{unit} hours = trial wall time x {c['device_per_trial']:g} {unit}s per trial).",
        "",
    ]
    lines += table(
        ["", "this sweep", "full-budget grid", "share"],
        [
            [
                "trial-epochs",
                c["trial_epochs"],
                c["grid_trial_epochs"],
                _share(c["trial_epochs"], c["grid_trial_epochs"]),
            ],
            [
                "trial hours (wall)",
                c["trial_hours"],
                c["grid_trial_hours"],
                _share(c["trial_hours"], c["grid_trial_hours"]),
            ],
            [
                f"{unit} hours",
                c[f"{unit.lower()}_hours"],
                c[f"grid_{unit.lower()}_hours"],
                _share(c[f"{unit.lower()}_hours"], c[f"grid_{unit.lower()}_hours"]),
            ],
        ],
    )
    return lines


def _share(a: float, b: float) -> str:
    return f"{100 * a / b:.0f}%" if b else "n/a"


def save_figures(data: dict, trials: list[dict], search: dict, importances: Any, out: Path, save) -> dict[str, Path]:
    return {name: save(fig, out / f"{name}.png") for name, fig in figures(data, trials, search, importances).items()}
