"""The sweep's Optuna study outlives it: every trial with its state in a journal that
optuna.load_study and optuna-dashboard open; a restore goes on with the same study; a warm start
seeds a new sweep with the earlier trials inside its space; several objectives give a Pareto front
that evaluate.py chooses from by a rule; the evaluation report shows the sweep.

Sweeps are slow on 2 cores, so the module runs two on one Ray instance: a 4-trial sweep with two
objectives (val/AP max, model/parameters min) in which one trial errors and ASHA stops some, and
a 1-trial sweep warm-started from it; every test reads their output."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState

from detr_ray import pareto
from detr_ray.data.demo import ensure_demo_shards
from detr_ray.evaluation.subject import EvaluationTargetError, from_experiment
from detr_ray.local_ray import init as init_local_ray
from detr_ray.tune import study
from detr_ray.tune.pruning import PruningOptunaSearch
from detr_ray.tune.resources import SweepError
from detr_ray.tune.space import parse_space
from detr_ray.tune.summary import summarize, write_summary
from detr_ray.tune.tuner import build_sweep
from tests.tiny_sweep import tiny_experiment, tiny_model

STATES = {"completed": TrialState.COMPLETE, "stopped early (ASHA)": TrialState.PRUNED, "error": TrialState.FAIL}


def _space(data: dict, search: dict, epochs: int, samples: int, seed: int = 0, **scheduler) -> object:
    return parse_space(
        {
            "experiment": tiny_experiment(data, epochs, steps=1, model=tiny_model(dec_layers=1)),
            "search": search,
            "scheduler": {
                "grace_period": 1,
                "reduction_factor": 2,
                "num_samples": samples,
                "seed": seed,
                "startup_trials": 2,
                **scheduler,
            },
        },
        "test space",
    )


def _run(space, name: str, storage: Path, **kwargs):
    sweep = build_sweep(space, name=name, storage_path=str(storage), **kwargs)
    results = sweep.fit()
    rows, best = summarize(results, space)
    written = write_summary(sweep, rows, best, {"train": "-", "val": space.experiment["data"].get("val", "-")})
    return sweep, rows, written


@pytest.fixture(scope="module")
def local_ray():
    # With the dashboard, Ray Train's PlacementGroupCleaner sees (state API) that a finished trial's
    # controller is gone and frees its placement group at once; without it the group waits for the
    # sweep's watch (RELEASE_GRACE_S, 20 s), and on 2 CPUs the next trial waits with it.
    init_local_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, val = ensure_demo_shards(tmp_path_factory.mktemp("demo"), num_train=16, num_val=8)
    return {"train": str(train), "val": str(val)}


@pytest.fixture(scope="module")
def first(local_ray, data, tmp_path_factory):
    """4 trials, 2 epochs, objectives val/AP (max) and model/parameters (min); trials drawn with
    the missing val shards error, ASHA stops some of the others."""
    storage = tmp_path_factory.mktemp("sweeps")
    missing = str(Path(data["val"]).parent / "no-such-val")
    space = _space(
        {"train": data["train"], "val": data["val"]},
        {
            "train.lr": {"loguniform": [1.0e-5, 1.0e-3]},
            "model.hidden_dim": {"choice": [16, 32]},
            "data.val": {"choice": [data["val"], missing]},
        },
        epochs=2,
        samples=4,
        seed=19,
        objectives={"model/parameters": "min"},
    )
    sweep, rows, written = _run(space, "first", storage)
    return {
        "space": space,
        "sweep": sweep,
        "rows": rows,
        "written": written,
        "dir": Path(sweep.experiment_dir),
        "storage": storage,
        "data": data,
        "missing": missing,
    }


@pytest.mark.sweep
@pytest.mark.timeout(600)
def test_the_study_records_every_trial_with_its_state(first):
    exp_dir, rows = first["dir"], first["rows"]
    journal = exp_dir / study.JOURNAL
    assert journal.is_file() and first["sweep"].study_storage == str(journal)
    loaded = optuna.load_study(
        study_name="first",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    by_tune_id = {t.user_attrs[study.TUNE_ID]: t for t in loaded.trials}
    assert len(loaded.trials) == 4 and sorted(by_tune_id) == sorted(r["trial"] for r in rows)
    states = {r["trial"]: STATES[r["status"]] for r in rows}
    assert {k: t.state for k, t in by_tune_id.items()} == states
    # Seed 19's first three proposals (random: TPE waits for 2 finished trials): missing val shards,
    # then two good trials of either size. Whether ASHA stops one depends on their first epoch's AP.
    assert {TrialState.COMPLETE, TrialState.FAIL} <= set(states.values())
    for r in rows:
        t = by_tune_id[r["trial"]]
        assert t.params["train.lr"] == pytest.approx(r["config"]["train.lr"])
        if t.state == TrialState.FAIL:
            assert r["config"]["data.val"] == first["missing"] and "history" not in t.user_attrs
        else:  # every epoch's objectives, as the trial reported them (several objectives: a user attribute)
            assert [(h["epoch"], h["val/AP"], h["model/parameters"]) for h in t.user_attrs["history"]] == [
                (h["epoch"], pytest.approx(h["val/AP"]), h["model/parameters"]) for h in r["history"]
            ]
        if t.state == TrialState.COMPLETE:  # the values at its last epoch
            assert t.values == [pytest.approx(r["history"][-1]["val/AP"]), r["history"][-1]["model/parameters"]]
    assert loaded.metric_names == ["val/AP", "model/parameters"]
    trials_doc = json.loads((exp_dir / "trials.json").read_text())
    assert trials_doc["study"] == {"storage": str(journal), "name": "first", "dashboard": f"optuna-dashboard {journal}"}
    # Tune's pickled searcher state holds where the study is, not a copy of it.
    state = pickle.loads(next(exp_dir.glob("searcher-state-*.pkl")).read_bytes())
    assert state["_ot_study"] is None and state["study_storage"] == str(journal)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.sweep
@pytest.mark.timeout(120)
def test_optuna_dashboard_serves_the_study(first):
    journal = first["dir"] / study.JOURNAL
    port = _free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    server = subprocess.Popen(
        [str(dashboard), str(journal), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline, summaries = time.time() + 60, None
        while summaries is None and time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    summaries = json.loads(r.read())["study_summaries"]
            except OSError:
                time.sleep(0.3)
        assert summaries is not None, (
            server.stderr.read().decode()[-2000:] if server.poll() is not None else "no answer"
        )
        (summary,) = [s for s in summaries if s["study_name"] == "first"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as r:
            detail = json.loads(r.read())
        assert sorted(t["state"] for t in detail["trials"]) == sorted(
            STATES[r["status"]].name.capitalize() for r in first["rows"]
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.sweep
@pytest.mark.timeout(300)
def test_a_restored_sweep_continues_its_study_without_duplicates(first):
    again = build_sweep(first["space"], name="first", storage_path=str(first["storage"]))
    assert again.restored and again.study_storage == str(first["dir"] / study.JOURNAL)
    again.fit()
    loaded = study.load(again.study_storage, "first")
    assert len(loaded.trials) == 4
    assert len({t.user_attrs[study.TUNE_ID] for t in loaded.trials}) == 4
    assert not [t for t in loaded.trials if t.state == TrialState.RUNNING]
    with pytest.raises(SweepError, match="continues its own study"):
        build_sweep(
            first["space"],
            name="first",
            storage_path=str(first["storage"]),
            study_storage=str(first["storage"] / "x.journal"),
        )
    with pytest.raises(SweepError, match="already holds a study|--warm-start seeds a new sweep"):
        build_sweep(first["space"], name="first", storage_path=str(first["storage"]), warm_start=str(first["dir"]))


def test_a_trial_proposed_after_the_last_saved_state_is_not_left_running(tmp_path):
    """Tune forgets a trial it created after its last saved experiment state; the restored
    searcher marks its Optuna trial FAIL instead of leaving it RUNNING for ever."""
    space = _space({}, {"train.lr": {"loguniform": [1.0e-5, 1.0e-3]}}, epochs=3, samples=4)
    spec = str(tmp_path / "optuna.journal")
    study.create_study(spec, "s", space)
    searcher = PruningOptunaSearch(
        metric="val/AP", mode="max", seed=0, max_epochs=3, study_storage=spec, study_name="s"
    )
    pickled = pickle.dumps(searcher)  # as in tuner.pkl
    searcher.set_search_properties(None, None, space.tune_domains())
    for t in ("a", "b"):
        searcher.suggest(t)
    searcher.on_trial_result("a", {"epoch": 1, "val/AP": 0.1})
    searcher.save(str(tmp_path / "state.pkl"))
    searcher.suggest("lost")
    restored = pickle.loads(pickled)
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_result("a", {"epoch": 1, "val/AP": 0.1})  # a resumed trial repeats its epoch: told once
    restored.on_trial_result("a", {"epoch": 2, "val/AP": 0.2})
    restored.on_trial_complete("a", {"epoch": 3, "val/AP": 0.3})
    restored.on_trial_complete("b", error=True)
    trials = {t.user_attrs[study.TUNE_ID]: t for t in study.load(spec, "s").trials}
    # The result that ends a trial (Tune passes it to on_trial_complete only) is its last epoch's value.
    assert trials["a"].state == TrialState.COMPLETE and trials["a"].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}
    assert trials["b"].state == TrialState.FAIL
    assert trials["lost"].state == TrialState.FAIL and trials["lost"].user_attrs["lost_in_restore"]


@pytest.mark.sweep
@pytest.mark.timeout(300)
def test_warm_start_seeds_the_new_study_with_the_trials_inside_its_space(first, tmp_path):
    rows = first["rows"]
    finished = sorted((r for r in rows if r["status"] != "error"), key=lambda r: r["config"]["train.lr"])
    upper = finished[-1]["config"]["train.lr"] * 0.999  # the largest lr falls outside the new range
    space = _space(
        {"train": first["data"]["train"], "val": first["data"]["val"]},
        {"train.lr": {"loguniform": [1.0e-5, upper]}, "model.hidden_dim": {"choice": [16, 32]}},
        epochs=1,
        samples=1,
        objectives={"model/parameters": "min"},
    )
    sweep, new_rows, written = _run(space, "warm", tmp_path, warm_start=str(first["dir"]))
    assert len(new_rows) == 1 and new_rows[0]["status"] == "completed"
    warm = json.loads(Path(written["trials"]).read_text())["warm_start"]
    old = {t.number: t for t in study.load(str(first["dir"] / study.JOURNAL), "first").trials}
    why = {w["trial"]: w["why"] for w in warm["ignored"]}
    used = sorted(int(u.split("#")[1]) for u in warm["used"])
    assert sorted(used + list(why)) == sorted(old)
    for number, t in old.items():
        if t.state == TrialState.FAIL:
            assert why[number] == "failed"
        elif t.params["train.lr"] > upper:
            assert why[number].startswith("param outside range: train.lr=")
        elif t.params["data.val"] != first["data"]["val"]:
            assert "this sweep fixes it to" in why[number]
        else:
            assert number in used
    assert used  # at least one earlier result lies inside the new space
    seeded = study.load(sweep.study_storage, "warm").trials
    assert len(seeded) == len(used) + 1
    for t in seeded[:-1]:  # the earlier results, as they were, before the sweep's own trial
        source = old[int(t.user_attrs[study.WARM_START].split("#")[1])]
        assert t.state == source.state and t.values == source.values
        assert t.params == {k: source.params[k] for k in ("train.lr", "model.hidden_dim")}
        assert t.user_attrs["history"] == source.user_attrs["history"]
    assert seeded[-1].user_attrs[study.TUNE_ID] == new_rows[0]["trial"] and seeded[-1].state == TrialState.COMPLETE


@pytest.mark.sweep
def test_several_objectives_give_a_pareto_front_chosen_by_a_rule(first, tmp_path):
    rows = first["rows"]
    finished = [r for r in rows if r["status"] == "completed"]
    assert finished and all(r["values"]["val/AP"] == r["best"] for r in finished)
    expected = pareto.front(finished, {"val/AP": "max", "model/parameters": "min"})
    front = json.loads(Path(first["written"]["best"]).read_text())
    assert isinstance(front, list) and sorted(e["trial"] for e in front) == sorted(r["trial"] for r in expected)
    for e in front:
        row = next(r for r in rows if r["trial"] == e["trial"])
        assert e["values"] == row["values"] and e["checkpoint"] == row["checkpoint"]
        assert row["values"]["model/parameters"] == row["history"][-1]["model/parameters"]

    # evaluate.py's choice: the best AP among models up to a size, the smallest, or a refusal.
    smallest = min(front, key=lambda e: e["values"]["model/parameters"])
    bound = smallest["values"]["model/parameters"]
    exp = str(first["dir"])
    chosen = from_experiment(exp, tmp_path, choose=f"max val/AP subject to model/parameters<={bound}")
    assert chosen.trial == smallest["trial"] and chosen.front == front
    assert (
        from_experiment(exp, tmp_path, choose="val/AP").trial
        == max(front, key=lambda e: e["values"]["val/AP"])["trial"]
    )
    with pytest.raises(EvaluationTargetError, match="no member of the front meets"):
        from_experiment(exp, tmp_path, choose=f"val/AP subject to model/parameters<{bound}")
    if len(front) > 1:
        with pytest.raises(EvaluationTargetError, match=f"Pareto front of {len(front)} trials.*--choose"):
            from_experiment(exp, tmp_path)


def test_a_front_of_several_needs_a_rule(tmp_path):
    entries = [
        {"trial": t, "value": ap, "values": {"val/AP": ap, "model/parameters": n}, "checkpoint": str(tmp_path / t)}
        for t, ap, n in (("a", 0.3, 4e6), ("b", 0.2, 2e6))
    ]
    (tmp_path / "best.json").write_text(json.dumps(entries))
    with pytest.raises(EvaluationTargetError, match=r"a Pareto front of 2 trials \(val/AP max\).*--choose"):
        from_experiment(str(tmp_path), tmp_path / "work")


def test_choosing_from_a_front():
    objectives = {"val/AP": "max", "model/parameters": "min"}
    entries = [
        {"trial": t, "values": {"val/AP": ap, "model/parameters": n}}
        for t, ap, n in (("a", 0.30, 4e6), ("b", 0.25, 2e6), ("c", 0.20, 3e6), ("d", 0.10, 1e6))
    ]
    assert [e["trial"] for e in pareto.front(entries, objectives)] == ["a", "b", "d"]  # c: b beats it in both
    assert pareto.choose(entries, "val/AP", objectives)["trial"] == "a"
    assert pareto.choose(entries, "min model/parameters", objectives)["trial"] == "d"
    assert pareto.choose(entries, "max val/AP subject to model/parameters<=2.5e6", objectives)["trial"] == "b"
    assert (
        pareto.choose(entries, "max val/AP subject to model/parameters<=2e6 and val/AP>0.2", objectives)["trial"] == "b"
    )
    for rule, message in (
        ("max", "expected"),
        ("val/AP subject to", "nothing after"),
        ("val/AR subject to val/AP>0", "not among"),
        ("val/AP subject to model/parameters<=x", "not a number"),
    ):
        with pytest.raises(pareto.RuleError, match=message):
            pareto.choose(entries, rule, objectives)


@pytest.mark.sweep
@pytest.mark.timeout(300)
def test_the_evaluation_report_shows_the_sweep(first, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "evaluate_script", Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    evaluate = script.main

    out = tmp_path / "report"
    assert (
        evaluate(
            [
                "--experiment",
                str(first["dir"]),
                "--choose",
                "max val/AP",
                "--out",
                str(out),
                "--no-progress",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    sweep = report["sweep"]
    assert [h["trial"] for h in sweep["history"]] == [r["trial"] for r in first["rows"]]  # Tune's creation order
    compute = sweep["compute"]
    assert compute["trial_epochs"] == sum(r["epochs"] for r in first["rows"]) < compute["grid_trial_epochs"] == 4 * 2
    assert 0 < compute["cpu_hours"] <= compute["grid_cpu_hours"]  # equal when ASHA stopped no trial
    rungs = dict((m, recorded) for m, recorded in sweep["asha"]["rungs"][0])
    assert sorted(rungs) == [1, 2] and rungs[1]  # rungs at epochs 1 and 2 (max_t); every trial that ran met the first
    assert sweep["front"] and sweep["choice"] == "max val/AP"
    for name in ("sweep_history", "sweep_parallel", "sweep_curves", "sweep_front"):
        assert (out / report["figures"][name]).stat().st_size > 1000
    md = (out / "report.md").read_text()
    for heading in (
        "## The sweep",
        "### Optimisation history",
        "### Parallel coordinates",
        "### Learning curves and ASHA's decisions",
        "### Compute spent",
        "### Parameter importances",
        "### Pareto front",
    ):
        assert heading in md
    assert f"optuna-dashboard {first['dir'] / study.JOURNAL}" in md
