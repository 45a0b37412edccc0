"""The local cluster rehearsal: scripts/local_cluster.sh starts a head and two worker raylets on
this machine with token authentication, jobs submitted with `ray job submit` run their driver on
the head and their work on the other nodes, and `down` leaves nothing behind.

One cluster for the module (starting it takes 10 s to a minute on a loaded 2-core machine); every
Ray command runs in a subprocess with the cluster's token, so this process's own Ray state and
the other tests' local `ray.init()` instances are untouched.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local_cluster.sh"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
TRAIN_SETTINGS = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not (BIN / "ray").exists() or not (shutil.which("setsid") and shutil.which("pgrep")),
        reason="needs the venv's ray, setsid and pgrep",
    ),
]


def _cluster_ports(base: int) -> list[int]:
    """GCS, dashboard, client server, and each node's raylet/agent ports (scripts/local_cluster.sh)."""
    return [base, base + 1, base + 2] + [base + 100 * (i + 1) + k for i in range(3) for k in range(6)]


def _listening(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((ip, port)) == 0


def _ports_free(base: int) -> bool:
    for port in _cluster_ports(base):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


class LocalCluster:
    def __init__(self):
        # A short private directory: Ray's socket paths under it must stay below 107 characters.
        self.dir = tempfile.mkdtemp(prefix="drc-", dir="/tmp")
        self.base = next(b for b in range(25000, 32000, 500) if _ports_free(b))
        # No RAY_ variable of this process (its address, its token) reaches the cluster, but for
        # the two Ray Train settings that every test run uses (tests/conftest.py).
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in TRAIN_SETTINGS}
        env.update(
            DETR_RAY_CLUSTER_DIR=os.path.join(self.dir, "cluster"),
            DETR_RAY_CLUSTER_PORT_BASE=str(self.base),
            RAY_BIN=RAY,
            # A job that falls back to the default demo data generates it here, not in ~/.cache.
            # (The nodes, and so the jobs, inherit this environment.)
            DETR_RAY_DEMO_DIR=os.path.join(self.dir, "demo-default"),
        )
        # The CPUs are the script's defaults, as in docs/cluster.md: head 1, each worker 3.
        self.script_env = env
        self.env = dict(env)  # + the cluster's address and token, from `local_cluster.sh env`
        self.dashboard = f"http://127.0.0.1:{self.base + 1}"

    def script(self, *args, timeout=300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), *args], env=self.script_env, capture_output=True, text=True, timeout=timeout
        )

    def up(self):
        run = self.script("up")
        assert run.returncode == 0, run.stdout + run.stderr
        for line in self.script("env").stdout.splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            self.env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
        self.node_ip = self.python(f"""
            import json
            from ray.util.state import list_nodes
            print(json.dumps(list_nodes(address="{self.dashboard}")[0].node_ip))
        """)

    def python(self, code: str, timeout=120) -> Any:
        """Runs `code` in a fresh interpreter with the cluster's env; returns the JSON it prints last."""
        run = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return json.loads(run.stdout.strip().splitlines()[-1])

    def submit(self, *entrypoint, working_dir=None, extra=(), env=None, timeout=600) -> subprocess.CompletedProcess:
        cmd = [RAY, "job", "submit", *extra]
        if working_dir:
            cmd += ["--working-dir", str(working_dir)]
        return subprocess.run(
            [*cmd, "--", *entrypoint],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.dir,
        )

    def nodes(self) -> dict[str, str]:
        """{custom resource that names the node: node id} of the alive nodes."""
        return self.python(f"""
            import json
            from ray.util.state import list_nodes
            names = {{}}
            for n in list_nodes(address="{self.dashboard}", detail=True):
                if n.state == "ALIVE":
                    for r in n.resources_total:
                        if r.startswith("rehearsal_"):
                            names[r] = n.node_id
            print(json.dumps(names))
        """)

    def cluster_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", "--", self.script_env["DETR_RAY_CLUSTER_DIR"] + "/"], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.up()
        yield c
    finally:
        c.script("down", timeout=120)
        shutil.rmtree(c.dir, ignore_errors=True)


def test_up_starts_head_and_two_workers_with_their_resources(cluster):
    nodes = cluster.nodes()
    assert set(nodes) == {"rehearsal_head", "rehearsal_worker_1", "rehearsal_worker_2"}
    assert len(set(nodes.values())) == 3
    # `ray status` (the autoscaler's view, a few seconds behind the GCS) shows the same cluster
    deadline = time.time() + 60
    while True:
        status = subprocess.run(
            [RAY, "status", f"--address=127.0.0.1:{cluster.base}"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr
        if re.search(r"/7\.0 CPU", status.stdout) or time.time() > deadline:  # 1 + 3 + 3
            break
        time.sleep(2)
    assert re.search(r"/7\.0 CPU", status.stdout), status.stdout
    for resource in ("sweep_driver", "rehearsal_head", "rehearsal_worker_1", "rehearsal_worker_2"):
        assert resource in status.stdout


def test_a_second_up_refuses(cluster):
    run = cluster.script("up")
    assert run.returncode != 0 and "already running" in run.stderr


def test_dashboard_on_localhost_requires_the_token(cluster):
    with urllib.request.urlopen(cluster.dashboard + "/", timeout=30) as page:  # the login page is public
        assert page.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(cluster.dashboard + "/api/version", timeout=30)
    assert refused.value.code == 401
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(cluster.dashboard + "/api/version", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.load(answer)["ray_version"]
    # bound to loopback only: not reachable on this machine's other addresses
    if cluster.node_ip != "127.0.0.1":  # the address other nodes reach this one at: no dashboard there
        assert not _listening(cluster.node_ip, cluster.base + 1)
        assert _listening(cluster.node_ip, cluster.base)  # while the GCS is
    if shutil.which("ss"):
        listening = subprocess.run(
            ["ss", "-ltnH", f"sport = :{cluster.base + 1}"], capture_output=True, text=True
        ).stdout
        assert listening.strip() and all(
            line.split()[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for line in listening.splitlines()
        )


def test_job_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = cluster.dir  # no ~/.ray/auth_token to fall back on
    run = cluster.submit("python", "-c", "print('should not run')", env=env, timeout=120)
    assert run.returncode != 0
    assert "Authentication" in run.stdout + run.stderr


def test_job_runs_its_driver_on_the_head_and_tasks_on_every_node(cluster):
    nodes = cluster.nodes()
    code = textwrap.dedent("""
        import json, ray
        ray.init()
        @ray.remote(num_cpus=0.1)
        def node():
            return ray.get_runtime_context().get_node_id()
        where = {r: ray.get(node.options(resources={r: 0.01}).remote())
                 for r in ("rehearsal_head", "rehearsal_worker_1", "rehearsal_worker_2")}
        print("RESULT " + json.dumps({"driver": ray.get_runtime_context().get_node_id(), "tasks": where}))
    """)
    run = cluster.submit("python", "-c", code, extra=["--entrypoint-resources", '{"sweep_driver": 1}'])
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(
        next(line for line in run.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT ")
    )
    assert result["driver"] == nodes["rehearsal_head"]
    assert result["tasks"] == nodes


def _actor_nodes(cluster, class_name: str, job_id: str) -> list[str]:
    """Node ids of a job's actors of one class (dead ones included), from Ray's state API: where
    the work really ran. RayTrainWorker: Train workers; TrainController: a run's Train driver;
    ImplicitFunc: a Tune trial's function trainable (the trial driver)."""
    return cluster.python(f"""
        import json
        from ray.util.state import list_actors
        actors = list_actors(address="{cluster.dashboard}", filters=[("class_name", "=", "{class_name}")],
                             detail=True, limit=10000)
        print(json.dumps([a.node_id for a in actors if a.job_id == "{job_id}"]))
    """)


def _job_id(cluster, submission_id: str) -> str:
    return cluster.python(f"""
        import json
        from ray.job_submission import JobSubmissionClient
        print(json.dumps(JobSubmissionClient("{cluster.dashboard}").get_job_info("{submission_id}").job_id))
    """)


def _submission_id(run: subprocess.CompletedProcess) -> str:
    m = re.search(r"Job '(raysubmit_\w+)' (succeeded|failed)", run.stdout + run.stderr)
    assert m, run.stdout + run.stderr
    return m.group(1)


@pytest.fixture(scope="module")
def demo_data(cluster):
    from detr_ray.data.demo import ensure_demo_shards

    root = os.path.join(cluster.dir, "demo")
    ensure_demo_shards(root, num_train=32, num_val=8)
    return root


@pytest.mark.slow
def test_train_job_spreads_its_workers_over_the_worker_nodes(cluster, demo_data):
    """scripts/train.py submitted as a job: two Train workers of 2 CPUs each, one on each worker
    node (3 CPUs each: one such worker per node; the head's 1 CPU holds none). The run finishes
    and writes its checkpoint to the shared (here: local) storage.

    Slow (DETR_RAY_SLOW=1): `make test` covers its parts more cheaply. The rehearsal sweep below
    submits a job to this cluster whose Train workers run on both worker nodes and whose drivers
    stay on the head; tests/train/test_distributed.py::TestTwoNodes spreads one Train run over
    two nodes; tests/scripts/test_train_cli.py runs scripts/train.py end to end."""
    storage = os.path.join(cluster.dir, "runs")
    run = cluster.submit(
        "python",
        "scripts/train.py",
        "--data",
        demo_data,
        "--storage",
        storage,
        "--name",
        "rehearsal-train",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--set",
        "train.cpus_per_worker=2",
        "--set",
        "train.max_steps_per_epoch=2",
        "--set",
        "data.decode_num_cpus=0.5",
        "--set",
        "data.batch_size=4",
        "--set",
        "model.hidden_dim=32",
        "--set",
        "model.dim_feedforward=64",
        working_dir=ROOT,
        extra=["--entrypoint-resources", '{"sweep_driver": 1}'],
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    nodes = cluster.nodes()
    job = _job_id(cluster, _submission_id(run))
    assert sorted(_actor_nodes(cluster, "RayTrainWorker", job)) == sorted(
        [nodes["rehearsal_worker_1"], nodes["rehearsal_worker_2"]]
    )
    assert _actor_nodes(cluster, "TrainController", job) == [nodes["rehearsal_head"]]
    assert list(Path(storage, "rehearsal-train").glob("checkpoint_*")), "no checkpoint in the run's storage"


def _readme_rehearsal_commands() -> tuple[list[str], list[str]]:
    """The `python scripts/prepare_coco.py ...` and `ray job submit ... python scripts/tune.py ...`
    commands of docs/cluster.md's "Rehearsal on one machine", as argv."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    section = text.split("\n## Rehearsal on one machine\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```\n(.*?)^```", section, flags=re.S | re.M).group(1)
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    prepare = [c for c in commands if c[:2] == ["python", "scripts/prepare_coco.py"]]
    submit = [c for c in commands if c[:3] == ["ray", "job", "submit"]]
    assert len(prepare) == 1 and len(submit) == 1, commands
    return prepare[0], submit[0]


@pytest.mark.timeout(1200)
def test_readme_sweep_runs_trials_on_more_than_one_node(cluster):
    """The rehearsal of docs/cluster.md, as written there (only the data and --storage moved into the
    test's directory): a small demo dataset, then a tiny sweep of two trials submitted with
    `ray job submit --working-dir . -- python scripts/tune.py ...`. Each trial has two 1-CPU Train
    workers; four do not fit on one 3-CPU worker node nor on the 1-CPU head, so the trials use both
    worker nodes. Every driver (the trials' and their Train runs') is on the head, and Tune's
    TensorBoard files are there too."""
    prepare, command = _readme_rehearsal_commands()
    data = os.path.join(cluster.dir, "rehearsal-data")
    # The sweep reads what the first command prepared.
    assert command[command.index("--data") + 1] == prepare[prepare.index("--out") + 1]
    prepare[prepare.index("--out") + 1] = command[command.index("--data") + 1] = data
    made = subprocess.run([sys.executable, *prepare[1:], "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert made.returncode == 0, made.stdout + made.stderr
    storage = os.path.join(cluster.dir, "sweeps")
    command[command.index("--storage") + 1] = storage
    name = command[command.index("--name") + 1]
    num_samples = int(command[command.index("--num-samples") + 1])
    workers_per_trial = int(command[command.index("--workers-per-trial") + 1])
    assert command[3:5] == ["--working-dir", "."] and num_samples >= 2
    run = subprocess.run([RAY, *command[1:]], env=cluster.env, capture_output=True, text=True, timeout=1100, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]

    nodes = cluster.nodes()
    workers = {nodes["rehearsal_worker_1"], nodes["rehearsal_worker_2"]}
    assert (Path(storage) / name / "best.json").is_file()
    trials = json.loads((Path(storage) / name / "trials.json").read_text())["trials"]
    assert len(trials) == num_samples and all(t["status"] == "completed" for t in trials), trials
    rank0_nodes = {n for t in trials for n in t["nodes"]}  # where each trial's rank 0 reported from
    assert rank0_nodes and rank0_nodes <= workers
    job = _job_id(cluster, _submission_id(run))
    used = _actor_nodes(cluster, "RayTrainWorker", job)
    assert len(used) == workers_per_trial * num_samples and set(used) == workers, (
        f"the trials' Train workers ran on {used}"
    )
    for driver in ("ImplicitFunc", "TrainController"):  # trial drivers and the Train drivers they start
        where = _actor_nodes(cluster, driver, job)
        assert where == [nodes["rehearsal_head"]] * num_samples, f"{driver} ran on {where}, not only on the head"
    # docs/cluster.md: TensorBoard on the head reads Tune's files from the head's session artifacts
    head_artifacts = Path(cluster.script_env["DETR_RAY_CLUSTER_DIR"], "ray-0", "session_latest", "artifacts")
    event_dirs = {p.parent for p in head_artifacts.glob(f"*/{name}/driver_artifacts/*/events.out.tfevents*")}
    assert len(event_dirs) == num_samples, f"Tune's TensorBoard files on the head: {sorted(event_dirs)}"


def test_down_stops_everything_and_frees_the_ports(cluster):
    assert cluster.cluster_pids(), "the cluster should be running before down"
    run = cluster.script("down", timeout=120)
    assert run.returncode == 0, run.stderr
    assert cluster.cluster_pids() == []
    assert not os.path.exists(cluster.script_env["DETR_RAY_CLUSTER_DIR"])
    still = [p for p in _cluster_ports(cluster.base) for ip in {"127.0.0.1", cluster.node_ip} if _listening(ip, p)]
    assert still == [], f"ports still served after down: {still}"
    assert "no cluster running" in cluster.script("down").stdout  # idempotent
