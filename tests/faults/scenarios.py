"""The faults of the fault suite, each injected for real, and the checks every one must pass.

Shared by tests/faults/ (one injection each) and benchmarks/faults.py (N injections each, plus a
clean run of the same work for the wall-time bar). Every scenario returns a record:

    fault         which one
    injected      the fault really happened (the kill landed, the disk filled, the node went away)
    survived      the work finished and every check below held
    epochs_lost   completed epochs (a verified checkpoint existed when the fault hit) trained again
    wall_s        wall time of the whole faulted work, restore included
    problems      what failed, in words (empty when survived)

The checks, after the restore: exactly num_samples distinct trials; no completed epoch lost (the
resumed attempt starts at the newest verified checkpoint taken at the fault) or trained twice
(an epoch reported by two attempts that both trained it); reports after a resume continue from
the checkpoint (first epoch = checkpoint epoch + 1, global_step = epochs x steps per epoch); the
best checkpoint verifies.

Train-level scenarios expect a Ray instance (the caller's, e.g. `local_ray`); the node-loss one
starts its own multi-node cluster; the driver-kill ones run scripts/tune.py in subprocesses that
start their own local Ray.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import ray.train
import yaml

from detr_ray import checkpoint as ckpt
from detr_ray.testing_hooks import TestingHooks
from tests.tiny_sweep import demo_shards, sweep_space, tiny_model, tune_command

REPO = Path(__file__).resolve().parents[2]
STEPS = 2  # train.max_steps_per_epoch everywhere: global_step == STEPS * epoch is an invariant
TUNE_BAR = 2.5  # Tune's own bar: a restored sweep takes at most 2.5x a clean one


def record(fault: str, injected: bool, wall_s: float, problems: list[str], epochs_lost: int, **details) -> dict:
    return {
        "fault": fault,
        "injected": injected,
        "survived": injected and not problems,
        "epochs_lost": epochs_lost,
        "wall_s": round(wall_s, 1),
        "problems": problems,
        **details,
    }


def checkpoint_epoch(name: str) -> int:
    """The epoch of checkpoint_epochNNNN or of a redone epoch's checkpoint_epochNNNN-K."""
    return int(name.removeprefix("checkpoint_epoch").split("-")[0])


def verified_epochs(run_dir: Path) -> list[int]:
    """Epochs of the run's checkpoints that verify (hashes), oldest first."""
    out = []
    for d in sorted(Path(run_dir).glob("checkpoint_epoch*")):
        try:
            ckpt.verify(d)
            out.append(checkpoint_epoch(d.name))
        except ckpt.CheckpointError:
            pass
    return out


def check_reports(reports: list[dict], saved: int, epochs: int, label: str) -> tuple[list[str], int]:
    """`reports` (rank 0's, in order, every attempt) against `saved`, the newest verified
    checkpoint's epoch when the fault hit. Returns (problems, epochs lost)."""
    problems = []
    trained = [r["epoch"] for r in reports if r["train/start_epoch"] < r["epoch"]]  # not a finished run's re-report
    twice = sorted({e for e in trained if trained.count(e) > 1})
    if twice:
        problems.append(f"{label}: epochs {twice} trained and reported twice")
    for r in reports:
        if r["global_step"] != STEPS * r["epoch"]:
            problems.append(
                f"{label}: epoch {r['epoch']} reports global_step {r['global_step']}, expected {STEPS * r['epoch']}"
            )
    after = [r for r in reports if r["epoch"] > saved]
    lost = 0
    if saved and after:
        start = min(r["train/start_epoch"] for r in after)
        lost = max(0, saved - start)
        if lost:
            problems.append(f"{label}: resumed at epoch {start} although epoch {saved} had a verified checkpoint")
        first = min(r["epoch"] for r in after if r["train/start_epoch"] == start)
        if first != start + 1:
            problems.append(f"{label}: first epoch after resuming from epoch {start} is {first}")
    return problems, lost


# --------------------------------------------------------------------------------------------
# Train-level faults: one TorchTrainer run


class ReportLog(ray.train.UserCallback):
    """Appends rank 0's metrics of every report (every attempt) to a JSON-lines file. Runs on
    the Train controller, so it sees what Ray registered."""

    KEYS = ("epoch", "global_step", "train/start_epoch", "val/AP")

    def __init__(self, path: str):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        line = {k: metrics[0].get(k) for k in self.KEYS}
        line["checkpoint"] = checkpoint.path if checkpoint is not None else None
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def read_reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def train_experiment(demo_root, **train) -> dict:
    from detr_ray.train.trainer import demo_experiment

    exp = demo_experiment()
    exp["model"].update(tiny_model())
    exp["data"].update(demo_shards(demo_root), batch_size=4, shuffle_buffer=8)
    exp["train"].update(epochs=3, max_steps_per_epoch=STEPS, max_failures=1, cpus_per_worker=1.0, tensorboard=False)
    exp["train"].update(train)
    return exp


def _fit(exp: dict, name: str, storage: Path, log: Path, **kwargs):
    from detr_ray.config import experiment_from_dict
    from detr_ray.train.trainer import build_trainer

    return build_trainer(
        experiment_from_dict(exp), name=name, storage_path=str(storage), callbacks=[ReportLog(str(log))], **kwargs
    ).fit()


def _check_run(
    result, run_dir: Path, reports: list[dict], saved: int, epochs: int, label: str
) -> tuple[list[str], int]:
    problems, lost = check_reports(reports, saved, epochs, label)
    m = result.metrics
    if m.get("epoch") != epochs or m.get("global_step") != STEPS * epochs:
        problems.append(f"{label}: finished at epoch {m.get('epoch')}, global_step {m.get('global_step')}")
    if saved and m.get("train/start_epoch") != saved and m.get("epoch", 0) > saved:
        problems.append(f"{label}: last attempt started at epoch {m.get('train/start_epoch')}, expected {saved}")
    best = (
        max(result.best_checkpoints, key=lambda cm: cm[1].get("checkpoint_score", -1.0))[0]
        if result.best_checkpoints
        else None
    )
    for c in (result.checkpoint, best):
        try:
            ckpt.verify(c.path) if c is not None else problems.append(f"{label}: no checkpoint")
        except ckpt.CheckpointError as e:
            problems.append(f"{label}: checkpoint does not verify: {e}")
    if epochs not in verified_epochs(run_dir):
        problems.append(f"{label}: no verified checkpoint of the last epoch {epochs} in {run_dir}")
    problems += check_registry(run_dir, label)
    return problems, lost


def check_registry(run_dir: Path, label: str) -> list[str]:
    """Ray Train's checkpoint registry (checkpoint_manager_snapshot.json, what it keeps and
    deletes by score) must name each directory once, and each must verify: two entries for one
    directory mean that evicting the stale one deletes the directory the other still holds."""
    path = Path(run_dir) / "checkpoint_manager_snapshot.json"
    if not path.exists():
        return []
    names = [r["checkpoint_dir_name"] for r in json.loads(path.read_text()).get("checkpoint_results", [])]
    problems = []
    for name in sorted(set(names)):
        if names.count(name) > 1:
            problems.append(
                f"{label}: Ray's checkpoint registry holds {names.count(name)} entries for {name} "
                "(a stale one and the redone epoch's): evicting the stale entry deletes the new checkpoint"
            )
        try:
            ckpt.verify(Path(run_dir) / name)
        except ckpt.CheckpointError as e:
            problems.append(f"{label}: registered checkpoint does not verify: {e}")
    return problems


def worker_sigkill(workdir: Path, demo_root, inject: bool = True) -> dict:
    """(a) A Train worker (rank 0, the one writing checkpoints) SIGKILLed mid-epoch: 3 epochs,
    killed at its second step of epoch 2 (global step STEPS + 1); Train restarts the worker group."""
    exp = train_experiment(demo_root, num_workers=2, epochs=3, max_failures=1)
    marker, log, storage = workdir / "killed", workdir / "reports.jsonl", workdir / "runs"
    crash = {"rank": 0, "step": STEPS + 1, "marker": str(marker), "signal": int(signal.SIGKILL)} if inject else None
    start = time.time()
    result = _fit(exp, "sigkill", storage, log, testing=TestingHooks(crash=crash))
    wall = time.time() - start
    injected = marker.exists() if inject else False
    problems, lost = _check_run(result, storage / "sigkill", read_reports(log), 1 if inject else 0, 3, "worker SIGKILL")
    return record("Train worker SIGKILL mid-epoch", injected, wall, problems, lost)


def truncated_checkpoint(workdir: Path, demo_root, inject: bool = True) -> dict:
    """(d) The newest checkpoint of a finished run truncated (model.pt cut to half), then the
    same run relaunched: it must skip the corrupt one, resume from the previous and redo it."""
    exp = train_experiment(demo_root, num_workers=1, epochs=2, max_failures=0)
    log, storage = workdir / "reports.jsonl", workdir / "runs"
    run_dir = storage / "truncated"
    start = time.time()
    result = _fit(exp, "truncated", storage, log)
    if not inject:
        problems, lost = _check_run(result, run_dir, read_reports(log), 0, 2, "clean")
        return record("newest checkpoint truncated", False, time.time() - start, problems, lost)
    victim = run_dir / "checkpoint_epoch0002" / "model.pt"
    size = victim.stat().st_size
    os.truncate(victim, size // 2)
    injected = verified_epochs(run_dir) == [1]
    before = len(read_reports(log))
    result = _fit(exp, "truncated", storage, log)
    wall = time.time() - start
    reports = read_reports(log)[before:]  # the relaunch's
    problems, lost = _check_run(result, run_dir, reports, 1, 2, "truncated checkpoint")
    # The corrupted directory stays (evidence, and Ray's registry may still list it); what matters
    # is that nothing detr-ray chooses is it: resume skipped it above, and the best checkpoint
    # that tune.py / train.py / evaluate.py pick verifies and is another directory.
    problems = [p for p in problems if str(victim.parent) + "/" not in p and not p.endswith(str(victim.parent))]
    chosen, _ = ckpt.best_checkpoint(str(run_dir), "val/AP", "max")
    if chosen is None or Path(chosen) == victim.parent:
        problems.append(f"truncated checkpoint: the chosen best checkpoint is {chosen}")
    if reports and reports[0]["train/start_epoch"] != 1:
        problems.append(
            f"relaunch started at epoch {reports[0]['train/start_epoch']}, expected 1 (the truncated epoch-2 "
            "checkpoint skipped)"
        )
    left = sorted(d.name for d in run_dir.glob("checkpoint_epoch*"))
    return record(
        "newest checkpoint truncated",
        injected,
        wall,
        problems,
        lost,
        checkpoints_after_relaunch=left,
        relaunch_reports=reports,
    )


# --------------------------------------------------------------------------------------------
# ENOSPC: a real full filesystem under the checkpoint writer


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size_mb: int):
    """A tmpfs of `size_mb` at `path` (root only); yields None when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Writes a file into `directory` until its filesystem is full (ENOSPC)."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


def enospc(workdir: Path, demo_root, full_dir: Path | None, inject: bool = True) -> dict:
    """(c) The filesystem the checkpoint writer (checkpoint.save, in the worker's TMPDIR) writes to
    fills up once epoch 1's checkpoint is stored: the run must fail without a bad checkpoint; once
    space is freed, the same run resumes from the last stored checkpoint and finishes.

    `full_dir`: the Train workers' TMPDIR, a tiny tmpfs (the caller's Ray was started with
    runtime_env env_vars TMPDIR=full_dir)."""
    exp = train_experiment(demo_root, num_workers=1, epochs=3, max_failures=0)
    log, storage = workdir / "reports.jsonl", workdir / "runs"
    run_dir = storage / "enospc"
    start = time.time()
    if not inject:
        result = _fit(exp, "enospc", storage, log)
        problems, lost = _check_run(result, run_dir, read_reports(log), 0, 3, "clean")
        return record("ENOSPC in the checkpoint writer", False, time.time() - start, problems, lost)

    filled: dict[str, Any] = {}
    # The run holds after epoch 1's checkpoint is stored until `release` exists: the disk fills
    # at that point, whatever the speed of the machine (a tiny epoch is shorter than a fill).
    release = workdir / "release-after-epoch1"

    def fill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not (run_dir / "checkpoint_epoch0001" / ckpt.MANIFEST).exists():
            time.sleep(0.02)
        try:
            filled["file"] = fill(full_dir)
        finally:
            release.write_text("filled")

    thread = threading.Thread(target=fill_after_first_checkpoint, daemon=True)
    thread.start()
    error = None
    try:
        _fit(exp, "enospc", storage, log, testing=TestingHooks(hold={"epoch": 1, "release": str(release)}))
    except Exception as e:  # noqa: BLE001 - the run must fail; its message is checked below
        error = e
    thread.join(timeout=60)
    saved = max(verified_epochs(run_dir), default=0)
    problems = []
    injected = "file" in filled and error is not None
    message = str(error)
    clear = bool(re.search(r"No space left|ENOSPC|Errno 28", message))
    if error is None:
        problems.append("the run finished on a full disk (the fill came too late?)")
    elif not clear:
        problems.append("the error does not say the disk is full: " + message[-600:].replace("\n", " | "))
    for d in sorted(run_dir.glob("checkpoint_epoch*")):
        if checkpoint_epoch(d.name) not in verified_epochs(run_dir):
            problems.append(f"{d} left behind and does not verify")
    if "file" in filled:
        filled["file"].unlink()
    before = len(read_reports(log))
    result = _fit(exp, "enospc", storage, log)
    wall = time.time() - start
    more, lost = _check_run(result, run_dir, read_reports(log)[before:], saved, 3, "after freeing space")
    return record(
        "ENOSPC in the checkpoint writer",
        injected,
        wall,
        problems + more,
        lost,
        clear_error=clear,
        saved_epoch_at_fault=saved,
    )


# --------------------------------------------------------------------------------------------
# Sweeps: what every restored sweep must satisfy


def trial_reports(exp_dir: Path) -> dict[str, list[dict]]:
    """Per trial, every result Tune recorded (result.json of its trial directory), in order."""
    out: dict[str, list[dict]] = {}
    for f in sorted(exp_dir.glob("trial_*/result.json")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if "epoch" in r and "trial_id" in r:
                    out.setdefault(r["trial_id"], []).append(r)
    return out


def saved_epochs(exp_dir: Path) -> dict[str, int]:
    """Per trial, its newest verified checkpoint's epoch (its Train run is runs/<trial id>)."""
    out = {}
    for run in sorted((exp_dir / "runs").glob("*")):
        epochs = verified_epochs(run)
        if epochs:
            out[run.name] = max(epochs)
    return out


def check_sweep(exp_dir: Path, num_samples: int, epochs: int, saved: dict[str, int]) -> tuple[list[str], int]:
    problems: list[str] = []
    path = exp_dir / "trials.json"
    if not path.exists():
        return [f"{path}: missing (the sweep did not finish)"], 0
    trials = json.loads(path.read_text())["trials"]
    ids = {t["trial"] for t in trials}
    if len(trials) != num_samples or len(ids) != num_samples or None in ids:
        problems.append(f"{len(trials)} trials, {len(ids)} distinct ids; expected {num_samples}")
    if len({json.dumps(t["config"], sort_keys=True) for t in trials}) != len(trials):
        problems.append("two trials share a configuration (a trial was started twice)")
    started = len(list(exp_dir.glob("trial_*")))
    if started != num_samples:
        problems.append(f"{started} trial directories for {num_samples} trials")
    for t in trials:
        if t["status"] not in ("completed", "stopped early (ASHA)"):
            problems.append(f"trial {t['trial']}: {t['status']}")
    lost = 0
    reports = trial_reports(exp_dir)
    for trial, k in sorted(saved.items()):
        if trial not in reports:
            problems.append(f"trial {trial} had a checkpoint at epoch {k} but no results after the restore")
    for trial, rs in sorted(reports.items()):
        more, n = check_reports(rs, saved.get(trial, 0), epochs, f"trial {trial}")
        problems += more
        lost += n
    for run in sorted((exp_dir / "runs").glob("*")):
        problems += check_registry(run, f"trial {run.name}")
    best = exp_dir / "best.json"
    if not best.exists():
        problems.append("best.json missing")
    else:
        try:
            ckpt.verify(json.loads(best.read_text())["checkpoint"])
        except ckpt.CheckpointError as e:
            problems.append(f"best checkpoint does not verify: {e}")
    return problems, lost


# --------------------------------------------------------------------------------------------
# (e) The sweep's driver (scripts/tune.py) SIGKILLed, then the same command run again


KILL_POINTS = {
    # a trial's directory exists, no checkpoint yet
    "trial_started": lambda exp_dir, epochs: (
        any(exp_dir.glob("trial_*")) and not any(exp_dir.glob("runs/*/checkpoint_epoch*/MANIFEST.json"))
    ),
    # some trial has a checkpoint, none has finished
    "mid_training": lambda exp_dir, epochs: any(exp_dir.glob("runs/*/checkpoint_epoch*/MANIFEST.json")),
    # some trial finished all its epochs
    "trials_finished": lambda exp_dir, epochs: any(exp_dir.glob(f"runs/*/checkpoint_epoch{epochs:04d}/MANIFEST.json")),
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then its process group: its local Ray goes down with it, as on a
    crashed machine (nothing else writes to the sweep afterwards)."""
    os.kill(proc.pid, signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    time.sleep(1.0)


def driver_kill(
    workdir: Path, demo_root, point: str | None, num_samples: int = 3, epochs: int = 3, timeout: float = 900
) -> dict:
    """(e) scripts/tune.py SIGKILLed at `point` (None: a clean sweep), then rerun."""
    space = workdir / "space.yaml"
    space.write_text(yaml.safe_dump(sweep_space(num_samples, epochs, STEPS)))
    storage, name = workdir / "sweeps", "faults"
    exp_dir = storage / name
    cmd = tune_command(space, Path(demo_root), storage, name)
    fault = f"driver SIGKILL ({point})" if point else "clean sweep"
    start = time.time()
    saved: dict[str, int] = {}
    injected = False
    logs = []
    if point is not None:
        reached = KILL_POINTS[point]
        with open(workdir / "first.log", "w") as log:
            first = subprocess.Popen(
                cmd, cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = time.time() + timeout
            while first.poll() is None and time.time() < deadline and not reached(exp_dir, epochs):
                time.sleep(0.05)
            injected = first.poll() is None and reached(exp_dir, epochs)
            _kill_tree(first) if first.poll() is None else None
        saved = saved_epochs(exp_dir)
        logs.append((workdir / "first.log").read_text()[-2000:])
    second = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=timeout)
    wall = time.time() - start
    problems = []
    if second.returncode != 0:
        problems.append(f"rerun exited {second.returncode}: {second.stderr[-1500:]}")
    if point is not None and "resuming sweep" not in second.stdout:
        problems.append("the rerun did not resume the sweep")
    more, lost = check_sweep(exp_dir, num_samples, epochs, saved)
    if not injected and point is not None:
        problems.append(f"the kill point {point} was not reached while the driver ran: " + logs[-1][-800:])
    return record(fault, injected if point else False, wall, problems + more, lost, saved_at_kill=saved)


# --------------------------------------------------------------------------------------------
# (b) A worker raylet of a local multi-node cluster stopped mid-sweep


@contextlib.contextmanager
def two_node_cluster(head_cpus: int = 1, worker_cpus: int = 2):
    """A head (which hosts the trial drivers, as cluster.yaml's head does) and a CPU worker node,
    with this process connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    from detr_ray.tune.resources import DRIVER_RESOURCE

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": head_cpus, "resources": {DRIVER_RESOURCE: 100}, "include_dashboard": False},
    )
    c.add_node(num_cpus=worker_cpus)
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def node_loss(workdir: Path, demo_root, cluster, inject: bool = True, num_samples: int = 2, epochs: int = 3) -> dict:
    """(b) Once some trial has a checkpoint, the worker node is killed (its raylet and every
    process on it, no grace), and a fresh node joins a few seconds later, as an autoscaler
    replaces a lost spot node. Train restarts the lost workers (train.max_failures)."""
    from detr_ray.tune.space import parse_space
    from detr_ray.tune.summary import summarize, write_summary
    from detr_ray.tune.tuner import build_sweep

    raw = sweep_space(num_samples, epochs, STEPS, max_failures=2)
    raw["experiment"]["data"].update(demo_shards(demo_root))
    space = parse_space(raw, "fault space")
    storage, name = workdir / "sweeps", "node-loss"
    exp_dir = storage / name
    worker = next(n for n in cluster.worker_nodes)
    removed: dict[str, Any] = {}

    def remove_when_training():
        deadline = time.time() + 600
        while time.time() < deadline and not any(exp_dir.glob("runs/*/checkpoint_epoch*/MANIFEST.json")):
            time.sleep(0.05)
        removed["node_id"] = worker.node_id
        removed["saved"] = saved_epochs(exp_dir)
        removed["actors"] = _actors_on(worker.node_id)
        cluster.remove_node(worker, allow_graceful=False)
        time.sleep(3)
        cluster.add_node(num_cpus=2)

    start = time.time()
    sweep = build_sweep(space, name=name, storage_path=str(storage))
    thread = threading.Thread(target=remove_when_training, daemon=True)
    if inject:
        thread.start()
    results = sweep.fit()
    rows, best = summarize(results, space)
    write_summary(sweep, rows, best, {})
    wall = time.time() - start
    if inject:
        thread.join(timeout=60)
    # Did the fault hit a Train worker? (What ran on the node when it went away.)
    hit = "RayTrainWorker" in removed.get("actors", [])
    # A trial on the lost node lost the epoch it was in, not a completed one: compare with the
    # checkpoints that existed when the node went away.
    problems, lost = check_sweep(exp_dir, num_samples, epochs, removed.get("saved", {}))
    return record(
        "worker node lost mid-sweep" if inject else "clean sweep (cluster)",
        inject and "node_id" in removed,
        wall,
        problems,
        lost,
        hit_train_worker=hit,
        actors_on_lost_node=removed.get("actors", []),
    )


def _actors_on(node_id: str) -> list[str]:
    """Class names of the live actors on a node (from the GCS actor table; no dashboard needed)."""
    from ray._private.state import actors

    return sorted(
        a["ActorClassName"] for a in actors().values() if a["Address"]["NodeID"] == node_id and a["State"] == "ALIVE"
    )
