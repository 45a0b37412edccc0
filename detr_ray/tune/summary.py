"""A finished sweep's record: per trial its sampled config, best metric, epochs, why it stopped,
best verified checkpoint and history (trials.json), and the best trial or the Pareto front
(best.json)."""

from __future__ import annotations

import json

from detr_ray import checkpoint as ckpt
from detr_ray import pareto
from detr_ray.data import storage
from detr_ray.train.trainer import run_resources
from detr_ray.tune import study
from detr_ray.tune.placement import read_leaks
from detr_ray.tune.space import SearchSpace, apply_sample
from detr_ray.tune.trial import RUNS_KEY, sample_of
from detr_ray.tune.tuner import Sweep

HISTORY_PREFIXES = ("train/", "val/", "model/")
HISTORY_KEYS = ("epoch", "lr", "lr_backbone", "time_this_iter_s", "time_total_s")  # times: the report's compute spent


def _status(result, ran: int, epochs: int) -> str:
    if result.error is not None:
        return "error"
    return "completed" if ran >= epochs else "stopped early (ASHA)"


def summarize(results, space: SearchSpace) -> tuple[list[dict], dict | None]:
    """Per trial: id, sampled config, best metric, epochs run, why it stopped, its best verified
    checkpoint, the nodes of its rank 0 and its per-epoch history; and the best trial (None
    when no trial has a verified checkpoint)."""
    metric, mode = space.scheduler.metric, space.scheduler.mode
    epochs = space.fixed.train.epochs
    rows = []
    for result in results:
        config = result.config or {}
        df = result.metrics_dataframe
        row = {
            "trial": None,
            "config": sample_of(config),
            "best": None,
            "epochs": 0,
            "status": "error" if result.error is not None else "no result",
            "checkpoint": None,
            "nodes": [],
            "history": [],
        }
        if df is not None and not df.empty and "trial_id" in df:
            row["trial"] = str(df["trial_id"].iloc[-1])
        elif (result.metrics or {}).get("trial_id"):  # a trial that failed before reporting
            row["trial"] = str(result.metrics["trial_id"])
        if df is not None and not df.empty and "epoch" in df and metric in df:
            df = df.sort_values("epoch").drop_duplicates("epoch", keep="last")
            row["epochs"] = int(df["epoch"].max())
            row["status"] = _status(result, row["epochs"], epochs)
            if "run/node_id" in df:
                row["nodes"] = sorted({str(n) for n in df["run/node_id"].dropna() if n})
            columns = [c for c in df.columns if c in HISTORY_KEYS or c.startswith(HISTORY_PREFIXES)]
            row["history"] = json.loads(df[columns].to_json(orient="records"))
        if row["trial"] and RUNS_KEY in config:
            row["checkpoint"], row["best"] = ckpt.best_checkpoint(
                storage.join(config[RUNS_KEY], row["trial"]), metric, mode
            )
        if row["best"] is None and row["history"]:  # no checkpoint left: the best reported value
            values = [h[metric] for h in row["history"] if isinstance(h.get(metric), (int, float))]
            row["best"] = (max if mode == "max" else min)(values) if values else None
        if space.scheduler.objectives:  # every objective at the trial's best checkpoint's epoch
            row["values"] = {
                metric: row["best"],
                **{m: best_row_value(row, metric, m) for m in space.scheduler.objectives},
            }
        rows.append(row)
    chosen = ckpt.best_trial(rows, mode, check=lambda location: None)  # each row's checkpoint verified above
    return rows, chosen[0] if chosen else None


def best_row_value(row: dict, metric: str, key: str) -> float | None:
    """`key` (e.g. val/AP50) at the epoch of the trial's history closest to its best `metric`."""
    epochs = [h for h in row["history"] if isinstance(h.get(metric), (int, float)) and h.get(key) is not None]
    if not epochs or row["best"] is None:
        return None
    return min(epochs, key=lambda h: abs(h[metric] - row["best"]))[key]


def pareto_front(rows: list[dict], space: SearchSpace) -> list[dict]:
    """Several objectives: the trials that ran all their epochs, have a verified checkpoint and
    that no other such trial beats in every objective (ASHA-stopped trials did not finish: their
    values are not comparable)."""
    finished = [r for r in rows if r["checkpoint"] and r["status"] == "completed" and r.get("values")]
    return pareto.front(finished, study.objectives(space))


def write_summary(sweep: Sweep, rows: list[dict], best: dict | None, data: dict[str, str]) -> dict[str, str]:
    """Writes trials.json (and best.json when a best trial exists: with several objectives, the
    Pareto front as a list); returns their locations."""
    space = sweep.space
    common = {"metric": space.scheduler.metric, "mode": space.scheduler.mode}
    scheduler = sweep.scheduler
    run = run_resources(space.fixed)
    trials = {
        **common,
        "objectives": study.objectives(space),
        "search": {p.key: {p.kind: p.args} for p in space.params},
        "epochs": space.fixed.train.epochs,
        "resources": {"gpus_per_trial": run.gpus, "cpus_per_trial": run.cpus},
        "study": {
            "storage": study.shown(sweep.study_storage),
            "name": sweep.study_name,
            "dashboard": study.dashboard_command(sweep.study_storage),
        }
        if sweep.study_storage
        else None,
        "warm_start": sweep.warm.describe() if sweep.warm is not None else None,
        # ASHA's records (rungs: [[milestone epoch, {trial: value there}], ...] per bracket) for the report
        "asha": {
            **scheduler.get_state(),
            "metric": space.scheduler.metric,
            "reduction_factor": scheduler._reduction_factor,
            "max_t": scheduler._max_t,
        }
        if scheduler is not None
        else None,
        "leaked_placement_groups": read_leaks(sweep.watch.record),
        "trials": rows,
    }
    out = {"trials": storage.join(sweep.experiment_dir, "trials.json")}
    storage.write_bytes_atomic(out["trials"], json.dumps(trials, indent=2, default=str).encode())

    def entry(row: dict) -> dict:
        return {
            **common,
            "trial": row["trial"],
            "value": row["best"],
            **({"values": row["values"]} if "values" in row else {}),
            "config": row["config"],
            "experiment": apply_sample(space.experiment, row["config"]),
            "checkpoint": row["checkpoint"],
            "data": data,
        }

    payload = None
    if space.scheduler.objectives:
        members = pareto_front(rows, space)
        payload = [entry(r) for r in members] if members else None
    elif best is not None:
        payload = entry(best)
    if payload is not None:
        out["best"] = storage.join(sweep.experiment_dir, "best.json")
        storage.write_bytes_atomic(out["best"], json.dumps(payload, indent=2, default=str).encode())
    return out
