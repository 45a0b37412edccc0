"""ASHA's rung records survive a killed and restored sweep: the restored sweep stops the trial
the rungs recorded before the kill would have stopped (Tune itself restores an empty ASHA)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray import tune

from detr_ray.local_ray import init as init_local_ray
from detr_ray.tune.scheduler import RungKeepingASHA, SchedulerState, asha_with_state

MAX_T = 4
SCORES = [0.9, 0.8, 0.7, 0.1]  # run one at a time, in this order; the driver dies in the last one
LOW = SCORES[-1]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file


def _trainable(config):
    for epoch in range(1, MAX_T + 1):
        marker = Path(config["kill_marker"])
        if config["score"] == LOW and marker.exists():  # first life of the sweep: kill its driver
            pid = int(marker.read_text())
            marker.unlink()
            os.kill(pid, signal.SIGKILL)
            time.sleep(60)
        time.sleep(0.05)
        tune.report({"epoch": epoch, "score": config["score"]})


def _first_life(address: str, storage: str, marker: str) -> None:
    """The sweep's first driver (run as a script): four trials one at a time, killed in the fourth."""
    ray.init(address=address, log_to_driver=False)
    Path(marker).write_text(str(os.getpid()))
    scheduler, state = asha_with_state(
        time_attr="epoch", max_t=MAX_T, grace_period=1, reduction_factor=2, metric="score", mode="max"
    )
    tuner = tune.Tuner(
        _trainable,
        param_space={"score": tune.grid_search(SCORES), "kill_marker": marker},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1, reuse_actors=False),
        run_config=tune.RunConfig(name="sweep", storage_path=storage, callbacks=[state]),
    )
    tuner.fit()


@pytest.fixture(scope="module")
def local_ray():
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.sweep
@pytest.mark.timeout(300)
def test_a_restored_sweep_stops_the_trial_its_rungs_stop(local_ray, tmp_path):
    marker = tmp_path / "driver.pid"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_scheduler as t; "
        f"t._first_life({ray.get_runtime_context().gcs_address!r}, {str(tmp_path)!r}, {str(marker)!r})"
    )
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"}  # the experiment state saved every step
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not marker.exists()

    tuner = tune.Tuner.restore(
        str(tmp_path / "sweep"), trainable=_trainable, resume_unfinished=True, resume_errored=True
    )
    results = tuner.fit()
    epochs = {r.config["score"]: int(r.metrics_dataframe["epoch"].max()) for r in results}
    # Before the kill: 0.9 ran to max_t, 0.8 and 0.7 fell below the first rung's median. After
    # the restore, 0.1 meets the first rung as recorded (0.9, 0.8, 0.7) and stops at once; an
    # ASHA with empty rungs has nothing to compare it with and runs it to max_t.
    assert epochs == {0.9: MAX_T, 0.8: 1, 0.7: 1, LOW: 1}, epochs


def test_state_round_trip_keeps_rungs_brackets_and_decisions():
    """Unit check of get_state/set_state: a fresh scheduler given the state decides as the old one."""

    class _Trial:  # ASHA reads only the id
        def __init__(self, trial_id):
            self.trial_id = trial_id

    kwargs = dict(
        time_attr="epoch", max_t=8, grace_period=1, reduction_factor=2, metric="score", mode="max", brackets=2
    )
    old, callback = asha_with_state(**kwargs)
    assert isinstance(callback, SchedulerState) and callback.scheduler is old
    trials = [_Trial(f"t{i}") for i in range(4)]
    for t in trials:
        old.on_trial_add(None, t)
    for t, score in zip(trials[:3], (0.9, 0.8, 0.7)):
        old.on_trial_result(None, t, {"epoch": 1, "score": score})
    new = RungKeepingASHA(**kwargs)
    SchedulerState(new).set_state(callback.get_state())
    new.on_trial_add(None, trials[3])
    assert new._trial_info["t3"] is new._brackets[old._brackets.index(old._trial_info["t3"])]
    assert new.get_state()["rungs"] == old.get_state()["rungs"]
    assert new.on_trial_result(None, trials[3], {"epoch": 1, "score": 0.1}) == old.on_trial_result(
        None, trials[3], {"epoch": 1, "score": 0.1}
    )
    with pytest.raises(ValueError, match="another configuration"):
        SchedulerState(RungKeepingASHA(**{**kwargs, "max_t": 16})).set_state(callback.get_state())


@pytest.mark.timeout(120)
def test_the_sweep_uses_the_rung_keeping_asha(local_ray, tmp_path):
    from detr_ray.tune.space import parse_space
    from detr_ray.tune.tuner import build_sweep

    space = parse_space(
        {
            "experiment": {
                "model": {"backbone": "resnet18"},
                "data": {"demo_root": str(tmp_path / "demo"), "decode_num_cpus": 0.25},
                "train": {"epochs": 3, "cpus_per_worker": 0.5},
            },
            "search": {"train.lr": {"loguniform": [1.0e-5, 1.0e-3]}},
            "scheduler": {"grace_period": 1, "reduction_factor": 2, "num_samples": 2},
        },
        "test space",
    )
    sweep = build_sweep(space, name="wired", storage_path=str(tmp_path / "sweeps"))
    scheduler = sweep.tuner._local_tuner._tune_config.scheduler
    assert isinstance(scheduler, RungKeepingASHA)
    assert any(
        isinstance(c, SchedulerState) and c.scheduler is scheduler
        for c in sweep.tuner._local_tuner.get_run_config().callbacks
    )
