"""scripts/train.py relaunched for real: a run without --name gets a new name; relaunched under that
name with another setting it is refused (exit 2, the difference listed, nothing resumed);
--resume-as-stored resumes with the stored configuration; more epochs continue the run."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from detr_ray import checkpoint as ckpt
from detr_ray.data.demo import ensure_demo_shards
from detr_ray.data.shards import read_shard_table
from tests.tiny_sweep import demo_shards, tiny_experiment, tiny_model

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.sweep  # the scripts run end to end, each starting its own Ray


def _train(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(1500)
def test_relaunch_with_other_settings_is_refused_and_resume_as_stored_uses_the_stored_ones(tmp_path):
    data = tmp_path / "demo"
    ensure_demo_shards(data, num_train=16, num_val=8)
    config = tmp_path / "tiny.yaml"
    experiment = tiny_experiment(demo_shards(data), epochs=1, steps=1, model=tiny_model(dec_layers=1), lr=2.0e-4)
    config.write_text(yaml.safe_dump(experiment))
    storage = tmp_path / "runs"
    base = ["--config", str(config), "--storage", str(storage)]

    first = _train(base, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert read_shard_table(str(data / "val"), ["image_id"]).num_rows == 8  # the test's shards, not a new demo
    name = re.search(r"^run name: (detr-\d{8}-\d{6}-[0-9a-f]{6})$", first.stdout, re.M).group(1)
    resume_command = re.search(r"^resume it with: (.*)$", first.stdout, re.M).group(1)
    assert shlex.split(resume_command)[-4:] == ["--name", name, "--storage", str(storage)]
    run_dir = storage / name
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch*")) == ["checkpoint_epoch0001"]
    record = (run_dir / "detr_ray_run.json").read_bytes()
    assert json.loads(record)["config"]["train"]["lr"] == 2e-4

    refused = _train([*base, "--name", name, "--set", "train.lr=1e-3"], tmp_path)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "train.lr: 0.0002 -> 0.001" in refused.stderr
    assert "--name" in refused.stderr and "--resume-as-stored" in refused.stderr
    assert "Ray dashboard" not in refused.stdout  # stopped before anything started
    assert (run_dir / "detr_ray_run.json").read_bytes() == record

    # As stored: the stored 1 epoch (done), not this command's 2 epochs nor its lr. The run had
    # finished, so it reports its final metrics from the checkpoint without starting Ray.
    as_stored = _train(
        [*base, "--name", name, "--set", "train.lr=1e-3", "--epochs", "2", "--resume-as-stored"], tmp_path
    )
    assert as_stored.returncode == 0, as_stored.stdout[-3000:] + as_stored.stderr[-3000:]
    assert "with its stored configuration" in as_stored.stdout
    assert "the run had finished: epoch 1 of 1, val/AP " in as_stored.stdout
    assert f"best verified checkpoint: {run_dir / 'checkpoint_epoch0001'}" in as_stored.stdout
    assert "Ray dashboard" not in as_stored.stdout
    assert "train.lr: 0.0002 -> 0.001" in as_stored.stderr  # the ignored differences are logged
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch*")) == ["checkpoint_epoch0001"]
    assert (run_dir / "detr_ray_run.json").read_bytes() == record

    # More epochs, nothing else: the run continues from its checkpoint with its own lr.
    more = _train([*base, "--name", name, "--epochs", "2"], tmp_path)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "continuing to 2 epochs (was 1)" in more.stdout
    state = ckpt.load(run_dir / "checkpoint_epoch0002").state
    assert state.metrics["train/start_epoch"] == 1 and state.metrics["lr"] == 2e-4
    assert state.config["train"]["lr"] == 2e-4 and state.config["train"]["epochs"] == 2
    assert json.loads((run_dir / "detr_ray_run.json").read_text())["config"]["train"]["epochs"] == 2


def test_a_run_is_finished_only_when_its_newest_verified_checkpoint_has_all_epochs(tmp_path):
    from detr_ray.cli.train import finished_state
    from tests.test_checkpoint import _save

    run = tmp_path / "run"
    assert finished_state(str(run), 2) is None  # no run
    _save(run / "checkpoint_epoch0001", epoch=1)
    _save(run / "checkpoint_epoch0002", epoch=2)
    assert finished_state(str(run), 2)["epoch"] == 2
    assert finished_state(str(run), 3) is None  # epochs left
    victim = run / "checkpoint_epoch0002" / "model.pt"
    victim.write_bytes(victim.read_bytes()[:-1])
    assert finished_state(str(run), 2) is None  # resume would redo epoch 2 from epoch 1's
    assert finished_state(str(run), 1)["epoch"] == 1
