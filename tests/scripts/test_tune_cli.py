"""scripts/tune.py end to end: killed with SIGKILL mid-sweep and run again, the sweep finishes
with exactly num_samples trials, none duplicated, the interrupted trial resumed from its
checkpoint; an invalid search space is refused before Ray starts; a restore under the same name
with a changed space is refused unless --resume-as-stored."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from detr_ray import checkpoint as ckpt
from detr_ray.data.demo import ensure_demo_shards
from detr_ray.tune.study import open_storage
from tests.tiny_sweep import sweep_space, tune_command

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.sweep  # the scripts run end to end, each starting its own Ray

# 3 trials, 2 at a time: when the sweep is killed one is still to be created.
SPACE = sweep_space(num_samples=3, epochs=3, steps=2)


def _checkpoints(exp_dir: Path) -> int:
    """Checkpoints the trials' Train runs have written (Tune's own result files lag behind)."""
    return len(list(exp_dir.glob("runs/*/checkpoint_epoch*/MANIFEST.json")))


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory):
    """The sweep of SPACE killed with SIGKILL once a trial has checkpointed, then run again to the
    end (the restore test below goes on with the same experiment rather than running a sweep of
    its own: each sweep costs minutes on 2 cores)."""
    tmp_path = tmp_path_factory.mktemp("kill-test")
    data = tmp_path / "demo"
    ensure_demo_shards(data, num_train=32, num_val=16)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    storage = tmp_path / "sweeps"
    exp_dir = storage / "kill-test"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            tune_command(space, data, storage, "kill-test"),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 400
        while _checkpoints(exp_dir) < 1 and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, (
            "the sweep ended before it could be killed: " + (tmp_path / "first.log").read_text()[-3000:]
        )
        assert _checkpoints(exp_dir) >= 1, "no trial wrote a checkpoint in time"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        saved = {}  # trial -> its last checkpointed epoch when the sweep died
        for m in exp_dir.glob("runs/*/checkpoint_epoch*/MANIFEST.json"):
            trial, epoch = m.parts[-3], int(m.parts[-2].removeprefix("checkpoint_epoch").split("-")[0])
            saved[trial] = max(saved.get(trial, 0), epoch)
        try:  # the local Ray it started goes down with it, as on a crashed machine
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    second = subprocess.run(
        tune_command(space, data, storage, "kill-test"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    return {
        "dir": tmp_path,
        "space": space,
        "data": data,
        "storage": storage,
        "env": env,
        "saved": saved,
        "second": second,
    }


@pytest.mark.timeout(900)
def test_sigkill_mid_sweep_then_rerun_finishes_without_duplicates(killed_sweep):
    second, saved = killed_sweep["second"], killed_sweep["saved"]
    exp_dir = killed_sweep["storage"] / "kill-test"
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming sweep" in second.stdout

    trials = json.loads((exp_dir / "trials.json").read_text())["trials"]
    samples = SPACE["scheduler"]["num_samples"]
    assert len(trials) == samples
    assert len({t["trial"] for t in trials}) == samples
    assert len({json.dumps(t["config"], sort_keys=True) for t in trials}) == samples
    assert len(list(exp_dir.glob("trial_*"))) == samples  # no trial was started twice
    assert all(t["status"] in ("completed", "stopped early (ASHA)") for t in trials)
    # A trial that had checkpoints when the sweep died continued from them, never from scratch
    # (ASHA may stop it at its rung before it reports again, so this can hold vacuously).
    for t in trials:
        done = saved.get(t["trial"], 0)
        for h in t["history"]:
            if done and h["epoch"] > done + 1:
                assert h["train/start_epoch"] >= done, (t["trial"], done, h)
    best = json.loads((exp_dir / "best.json").read_text())
    ckpt.verify(best["checkpoint"])
    assert "evaluate it: python scripts/evaluate.py --experiment" in second.stdout
    # The Optuna study went on across the kill: one Optuna trial per Tune trial, none left RUNNING
    # (one proposed after the last saved state, if any, is marked FAIL and is no Tune trial).
    study = optuna.load_study(study_name="kill-test", storage=open_storage(str(exp_dir / "optuna.journal")))
    counted = [t for t in study.trials if not t.user_attrs.get("lost_in_restore")]
    assert sorted(t.user_attrs["tune_trial_id"] for t in counted) == sorted(t["trial"] for t in trials)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert f"optuna-dashboard {exp_dir / 'optuna.journal'}" in second.stdout
    # What the console shows: Tune's table of the searched parameters, a line per trial and epoch,
    # where Ray's logs are; not Ray's internals or the fixed experiment (they are in the logs).
    console = second.stdout + second.stderr
    assert "Ray's logs (the trials' Train workers, Ray Data): /" in console
    assert "train.weight_decay" in console and "TERMINATED" in console
    assert re.search(r"trial \w+ epoch [1-3]/3: loss \d", console)
    for internal in (
        "_experiment",
        "Reporting training result",
        "(RayTrainWorker",
        "(TrainController",
        "Execution plan",
        "maximum expected startup concurrency",
    ):
        assert internal not in console, internal
    for t in trials:  # each trial's directory: its id and its sampled values
        assert [p.name for p in exp_dir.glob(f"trial_{t['trial']}_*")] == [
            f"trial_{t['trial']}_train.lr={t['config']['train.lr']:.3g},train.weight_decay={t['config']['train.weight_decay']:.3g}"
        ]


@pytest.mark.timeout(120)
def test_invalid_space_is_refused_before_ray_starts(tmp_path):
    bad = {**SPACE, "search": {"train.lr": {"loguniform": [1.0e-3, 1.0e-5]}}}
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump(bad))
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tune.py"), "--space", str(space), "--storage", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2
    assert "bad.yaml" in r.stderr and "search.train.lr" in r.stderr
    assert "Ray dashboard" not in r.stdout  # refused before Ray started


@pytest.mark.timeout(900)
def test_restore_with_a_changed_space_is_refused_unless_resume_as_stored(killed_sweep):
    tmp_path, space, storage, env = (
        killed_sweep["dir"],
        killed_sweep["space"],
        killed_sweep["storage"],
        killed_sweep["env"],
    )
    command = tune_command(space, killed_sweep["data"], storage, "kill-test")
    assert killed_sweep["second"].returncode == 0, "the sweep to restore did not finish"
    record = (storage / "kill-test" / "detr_ray_sweep.json").read_bytes()

    changed_space = copy.deepcopy(SPACE)
    changed_space["search"]["train.lr"] = {"loguniform": [1.0e-5, 1.0e-2]}
    space.write_text(yaml.safe_dump(changed_space))
    changed = [*command, "--set", "train.weight_decay=0.0", "--grace-period", "2"]
    refused = subprocess.run(changed, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "search.train.lr.loguniform: [1e-05, 0.001] -> [1e-05, 0.01]" in refused.stderr
    assert "scheduler.grace_period: 1 -> 2" in refused.stderr
    assert "experiment.train.weight_decay: 0.0001 -> 0.0" in refused.stderr
    assert "--resume-as-stored" in refused.stderr and "--name" in refused.stderr
    assert "resuming sweep" not in refused.stdout
    assert (storage / "kill-test" / "detr_ray_sweep.json").read_bytes() == record

    as_stored = subprocess.run(
        [*changed, "--resume-as-stored"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert as_stored.returncode == 0, as_stored.stdout[-3000:] + as_stored.stderr[-3000:]
    assert "resuming sweep" in as_stored.stdout
    trials = json.loads((storage / "kill-test" / "trials.json").read_text())
    assert trials["search"]["train.lr"] == {"loguniform": [1.0e-5, 1.0e-3]}  # summarized with the stored space
    assert len(trials["trials"]) == SPACE["scheduler"]["num_samples"]
