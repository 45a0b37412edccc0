"""scripts/local_cluster.sh and DETR_RAY_CLUSTER_DIR: `down` deletes that directory, so `up` takes
only a new or empty one (and marks it), and neither touches a directory of other files. No Ray is
started here: RAY_BIN is a stand-in that fails, so even a missing check could not start nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local_cluster.sh"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not (shutil.which("setsid") and shutil.which("pgrep")), reason="needs setsid and pgrep"),
]


def _run(command: str, directory: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "ray").write_text("#!/bin/sh\nexit 1\n")
    (fake / "ray").chmod(0o755)
    env = {
        **os.environ,
        "RAY_BIN": str(fake / "ray"),
        "DETR_RAY_CLUSTER_DIR": str(directory),
        "DETR_RAY_CLUSTER_PORT_BASE": "47000",
    }
    return subprocess.run([str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=50)


@pytest.fixture
def users_dir(tmp_path) -> Path:
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("my notes")
    (directory / "sessions").write_text("my sessions")  # a name the script uses for its own file
    return directory


def test_down_leaves_a_directory_it_did_not_create(users_dir, tmp_path):
    run = _run("down", users_dir, tmp_path)
    assert users_dir.exists() and sorted(p.name for p in users_dir.iterdir()) == ["notes.txt", "sessions"]
    assert (users_dir / "sessions").read_text() == "my sessions"
    assert run.returncode == 0, run.stderr
    assert "nothing stopped or deleted" in run.stdout


def test_up_refuses_a_directory_of_other_files(users_dir, tmp_path):
    run = _run("up", users_dir, tmp_path)
    assert sorted(p.name for p in users_dir.iterdir()) == ["notes.txt", "sessions"]
    assert (users_dir / "sessions").read_text() == "my sessions"
    assert run.returncode == 1
    assert f"error: {users_dir} holds files this script did not create" in run.stderr
