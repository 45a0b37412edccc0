"""The sweep on a local Ray: resources planned so nothing starves, Optuna proposes, ASHA stops,
every trial's Train placement group is released, and best.json names a verified checkpoint."""

import json
import logging

import optuna
import pytest
import ray
from optuna.trial import TrialState

from detr_ray import checkpoint as ckpt
from detr_ray.checkpoint import best_checkpoint
from detr_ray.config import ConfigError, experiment_from_dict
from detr_ray.data.demo import ensure_demo_shards
from detr_ray.data.shards import read_shard_table
from detr_ray.local_ray import init as init_local_ray
from detr_ray.tune.placement import live_placement_groups
from detr_ray.tune.pruning import PruningOptunaSearch
from detr_ray.tune.resources import (
    DRIVER_RESOURCE,
    SweepError,
    TrialNeeds,
    max_concurrent_trials,
    plan_concurrency,
    trial_needs,
)
from detr_ray.tune.space import parse_space
from detr_ray.tune.study import open_storage
from detr_ray.tune.summary import summarize, write_summary
from detr_ray.tune.tuner import build_sweep
from tests.tiny_sweep import demo_shards, tiny_experiment


def _space(root, **scheduler):
    return parse_space(
        {
            "experiment": tiny_experiment(demo_shards(root), epochs=3, steps=2),
            "search": {"train.lr": {"loguniform": [1.0e-5, 1.0e-3]}},
            "scheduler": {"grace_period": 1, "reduction_factor": 2, "num_samples": 4, "seed": 0, **scheduler},
        },
        "test space",
    )


# --------------------------------------------------------------------------------------------
# Resource planning (no Ray needed)


def test_trial_needs_count_workers_data_and_driver():
    exp = {
        "train": {"num_workers": 2, "cpus_per_worker": 1.5, "gpus_per_worker": 0.5},
        "data": {"decode_num_cpus": 0.5},
    }
    needs = trial_needs(experiment_from_dict(exp), {"CPU": 16.0})
    assert needs.cpus == pytest.approx(2 * 1.5 + 2 * 0.5 + 0.01)
    assert needs.gpus == pytest.approx(1.0)
    assert needs.worker == {"CPU": 1.5, "GPU": 0.5}
    assert DRIVER_RESOURCE not in needs.driver
    # A cluster that marks its driver node (cluster.yaml's head) gets its drivers pinned there.
    assert trial_needs(experiment_from_dict(exp), {"CPU": 16.0, DRIVER_RESOURCE: 100.0}).driver[DRIVER_RESOURCE] > 0
    # An explicit Ray Data cap replaces the per-worker default.
    exp["data"]["ray_data_cpus"] = 6.0
    assert trial_needs(experiment_from_dict(exp), {}).cpus == pytest.approx(3.0 + 6.0 + 0.01)


def test_concurrency_from_cluster_resources():
    needs = TrialNeeds(cpus=1.01, gpus=0.0, worker={"CPU": 0.5}, driver={"CPU": 0.01})
    assert max_concurrent_trials({"CPU": 2.0}, needs) == 1
    assert max_concurrent_trials({"CPU": 16.0}, needs) == 15
    gpu = TrialNeeds(cpus=2.01, gpus=0.25, worker={"CPU": 2.0, "GPU": 0.25}, driver={"CPU": 0.01})
    assert max_concurrent_trials({"CPU": 16.0, "GPU": 1.0}, gpu) == 4  # fractional GPUs: 4 trials share one
    assert max_concurrent_trials({"CPU": 4.0, "GPU": 8.0}, gpu) == 1  # CPUs are the limit
    assert plan_concurrency({"CPU": 2.0}, needs, requested=6) == 6  # an autoscaling cluster grows into it


def test_a_trial_that_cannot_fit_is_refused_before_anything_starts():
    needs = TrialNeeds(cpus=2.01, gpus=1.0, worker={"CPU": 1.0, "GPU": 1.0}, driver={"CPU": 0.01})
    with pytest.raises(SweepError, match=r"needs 2.01 CPUs and 1 GPUs .* cluster has 16 CPUs and 0 GPUs"):
        plan_concurrency({"CPU": 16.0}, needs)
    with pytest.raises(SweepError, match=">= 1"):
        plan_concurrency({"CPU": 16.0}, needs, requested=0)


def test_a_sweep_needs_the_metric_every_epoch(tmp_path):
    space = _space(tmp_path)
    space = parse_space(
        {"experiment": {**space.experiment, "train": {**space.experiment["train"], "eval_every": 2}}}, "test space"
    )
    with pytest.raises(ConfigError, match="eval_every must be 1"):
        build_sweep(space, name="x", storage_path=str(tmp_path))


def test_tpe_starts_after_the_configured_number_of_trials():
    search = PruningOptunaSearch(metric="val/AP", mode="max", seed=0, max_epochs=3, startup_trials=3)
    assert search._sampler._n_startup_trials == 3  # Optuna's default (10) would outnumber a small sweep


def _run_with_spoilt_checkpoints(run):
    """A Train run's directory: epoch 1 (AP 0.2) and epoch 4 (0.3) verify; epoch 2 (0.5) has a
    flipped byte, epoch 3 (0.4) a malformed manifest, epoch 5 (0.9) was never finished."""
    import torch

    from detr_ray.model import build_model
    from tests.conftest import tiny_config

    model = build_model(tiny_config())
    for epoch, ap in ((1, 0.2), (2, 0.5), (3, 0.4), (4, 0.3), (5, 0.9)):
        torch.nn.init.normal_(model.class_embed.weight)  # every checkpoint its own weights
        state = ckpt.TrainingState(epoch=epoch, global_step=epoch, config={}, metrics={"val/AP": ap})
        ckpt.save(run / f"checkpoint_epoch{epoch:04d}", model, None, None, None, state)
    blob = bytearray((run / "checkpoint_epoch0002" / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (run / "checkpoint_epoch0002" / "model.pt").write_bytes(bytes(blob))
    manifest = json.loads((run / "checkpoint_epoch0003" / ckpt.MANIFEST).read_text())
    (run / "checkpoint_epoch0003" / ckpt.MANIFEST).write_text(
        json.dumps({**manifest, "files": list(manifest["files"])})
    )
    (run / "checkpoint_epoch0005" / ckpt.MANIFEST).unlink()
    (run / "tensorboard").mkdir()


@pytest.mark.parametrize("where", ["local", "uri"])
def test_best_checkpoint_is_the_best_that_verifies_on_any_storage(tmp_path, where):
    run = tmp_path / "runs" / "trial_0"
    _run_with_spoilt_checkpoints(run)
    location = str(run) if where == "local" else "file://" + str(run)
    path, value = best_checkpoint(location, "val/AP", "max")
    assert (path, value) == (f"{location}/checkpoint_epoch0004", 0.3)
    ckpt.verify(path)
    assert best_checkpoint(location, "val/AP", "min") == (f"{location}/checkpoint_epoch0001", 0.2)
    assert best_checkpoint(location, "val/AP50", "max") == (None, None)  # no checkpoint recorded it


# --------------------------------------------------------------------------------------------
# A real sweep


@pytest.fixture(scope="module")
def local_ray():
    # Two trials at once on 2 CPUs: each holds a 0.5-CPU worker, 0.25 CPU of Ray Data, its driver.
    # With the dashboard, Ray Train's PlacementGroupCleaner sees (state API) that a finished trial's
    # controller is gone and frees its placement group at once; without it the group waits for the
    # sweep's watch (RELEASE_GRACE_S, 20 s), and on 2 CPUs the next trial waits with it.
    init_local_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.sweep
@pytest.mark.timeout(600)
def test_fast_sweep_stops_early_releases_resources_and_writes_best_json(local_ray, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="detr_ray.tune.console")
    root = tmp_path / "demo"
    ensure_demo_shards(root, num_train=32, num_val=16)
    space = _space(root)
    sweep = build_sweep(space, name="fast", storage_path=str(tmp_path / "sweeps"))
    assert sweep.concurrency == 2  # 2 CPUs / (0.5 worker + 0.25 Ray Data + 0.01 driver)
    results = sweep.fit()
    assert len(results) == 4 and not results.errors
    # The trials ran on the test's 32 + 16 images, not on a default-size demo generated over them.
    assert read_shard_table(str(root / "val"), ["image_id"]).num_rows == 16

    # Every trial's Train placement group is gone (Ray's own cleanup or the sweep's watch).
    assert live_placement_groups() == []

    rows, best = summarize(results, space)
    assert len(rows) == 4
    assert len({r["trial"] for r in rows}) == 4
    assert len({r["config"]["train.lr"] for r in rows}) == 4  # Optuna proposed 4 configurations
    stopped = [r for r in rows if r["status"] == "stopped early (ASHA)"]
    assert stopped and all(r["epochs"] < 3 for r in stopped)
    assert any(r["status"] == "completed" and r["epochs"] == 3 for r in rows)
    for r in rows:
        assert [h["epoch"] for h in r["history"]] == list(range(1, r["epochs"] + 1))
        assert r["nodes"]  # where rank 0 ran

    # The console: Tune's table with the searched parameter and the sweep's metrics, not the fixed
    # experiment; one line per trial and epoch; trial directories named by trial id and sampled value.
    table = capsys.readouterr().out
    assert "train.lr" in table and "val/AP50" in table and "TERMINATED" in table and "_experiment" not in table
    lines = sorted(r.getMessage().split(":")[0] for r in caplog.records if r.name == "detr_ray.tune.console")
    assert lines == sorted(f"trial {r['trial']} epoch {h['epoch']}/3" for r in rows for h in r["history"])
    dirs = sorted(p.name for p in (tmp_path / "sweeps" / "fast").glob("trial_*"))
    assert dirs == sorted(f"trial_{r['trial']}_train.lr={r['config']['train.lr']:.3g}" for r in rows)

    written = write_summary(sweep, rows, best, {"train": str(root / "train"), "val": str(root / "val")})
    data = json.loads(open(written["best"]).read())
    assert data["value"] == max(r["best"] for r in rows)
    assert data["trial"] == best["trial"] and data["config"] == best["config"]
    assert data["experiment"]["train"]["lr"] == best["config"]["train.lr"]
    ckpt.verify(data["checkpoint"])
    state = json.loads(open(f"{data['checkpoint']}/state.json").read())
    assert state["metrics"]["val/AP"] == pytest.approx(data["value"])  # the checkpoint of the best epoch
    trials = json.loads(open(written["trials"]).read())
    assert len(trials["trials"]) == 4 and trials["search"] == {"train.lr": {"loguniform": [1.0e-5, 1.0e-3]}}

    # Optuna saw ASHA's stops as pruned trials, not as finished ones with truncated scores.
    study = optuna.load_study(
        study_name="fast", storage=open_storage(str(tmp_path / "sweeps" / "fast" / "optuna.journal"))
    )
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == len(stopped)
    assert states.count(TrialState.COMPLETE) == 4 - len(stopped)

    # The same name again restores the finished sweep instead of starting over; resume=False refuses.
    again = build_sweep(space, name="fast", storage_path=str(tmp_path / "sweeps"))
    assert again.restored
    with pytest.raises(SweepError, match="already holds a sweep"):
        build_sweep(space, name="fast", storage_path=str(tmp_path / "sweeps"), resume=False)

    # A state file that its driver was killed while copying to the storage: Tune would start the
    # sweep over from its first trial; the restore refuses, naming the file, and changes nothing.
    exp_dir = tmp_path / "sweeps" / "fast"
    for pattern in ("searcher-state-*.pkl", "experiment_state-*.json"):
        (victim,) = exp_dir.glob(pattern)
        whole = victim.read_bytes()
        victim.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(SweepError, match="saved state is incomplete") as refused:
            build_sweep(space, name="fast", storage_path=str(tmp_path / "sweeps"))
        assert str(victim) in str(refused.value)
        assert victim.read_bytes() == whole[: len(whole) // 2]
        victim.write_bytes(whole)
    assert build_sweep(space, name="fast", storage_path=str(tmp_path / "sweeps")).restored
