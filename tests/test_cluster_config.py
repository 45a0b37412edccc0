"""cluster.yaml: valid for Ray's cluster launcher, nothing public but SSH from the operator, token
authentication on, every referenced file present, versions the same as requirements.txt.

Nothing here contacts AWS: the config goes through the same prepare + schema validation as
`ray up` does before it calls the cloud provider.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SECURITY_GROUP_SCRIPT = ROOT / "scripts" / "aws_security_group.sh"
PROJECT_ON_NODE = "~/detr-ray"  # where file_mounts puts the repository on every node
TOKEN_PATH = "~/.ray/auth_token"  # Ray's default token file (ray._private.authentication)
RAY_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client"}
WORLD = {"0.0.0.0/0", "::/0"}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def requirement_pins() -> dict[str, str]:
    """{package name (lower case, extras dropped): version} of requirements.txt's exact pins."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def all_commands(config: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    commands = [c for k in keys for c in config.get(k) or []]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("initialization_commands") or []
        commands += node_type.get("worker_setup_commands") or []
    return commands


def public_exposures(rules: list[dict]) -> list[str]:
    """What each EC2 ingress rule (IpPermissions form) opens to the whole internet: Ray's ports,
    all ports, or anything at all but SSH."""
    problems = []
    for rule in rules:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if not cidrs & WORLD:
            continue
        proto, lo, hi = str(rule.get("IpProtocol")), rule.get("FromPort", -1), rule.get("ToPort", -1)
        if proto == "-1" or lo in (-1, None) or (lo, hi) == (0, 65535):
            problems.append(f"all ports open to the internet: {rule}")
            continue
        problems += [
            f"{name} port {port} open to the internet: {rule}" for port, name in RAY_PORTS.items() if lo <= port <= hi
        ]
        if (lo, hi) != (22, 22):
            problems.append(f"ports {lo}-{hi} open to the internet: {rule}")
        else:
            problems.append(f"SSH open to the internet instead of the operator's CIDR: {rule}")
    return problems


# --- Ray's own validation -------------------------------------------------------------------


def test_passes_ray_cluster_launcher_validation(config):
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does first: defaults merged
    validate_config(prepared)  # Ray's ray-schema.json + its own consistency checks
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])


def test_validation_catches_a_broken_config(config):
    """The validator is not a no-op on this config: the mistakes YAML makes easy are refused."""
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["resources"] = {"sweep_driver": 0.5}  # must be integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(config)
    broken["setup_commands"] = [{"echo x": "y"}]  # an unquoted colon turns a command into a mapping
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


# --- Versions -----------------------------------------------------------------------------------


def test_docker_image_is_the_pinned_ray_version(config):
    ray_version = requirement_pins()["ray"]
    docker = config["docker"]
    images = [docker["image"]] + [docker[k] for k in ("head_image", "worker_image") if k in docker]
    for node_type in config["available_node_types"].values():
        images += [v for k, v in (node_type.get("docker") or {}).items() if k.endswith("image")]
    for image in images:
        m = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py(\d)(\d+)(-gpu|-cu\d+)", image)
        assert m, f"{image}: not a versioned rayproject GPU image (rayproject/ray:X.Y.Z-pyNN-gpu)"
        assert m.group(1) == ray_version, f"{image}: Ray {m.group(1)}, requirements.txt pins {ray_version}"


def test_every_node_installs_requirements_and_the_project(config):
    setup = " && ".join(config["setup_commands"])
    assert f"pip install -q -r {PROJECT_ON_NODE}/requirements.txt" in setup
    assert f"pip install -q --no-deps -e {PROJECT_ON_NODE}" in setup
    # a per-node-type worker_setup_commands would replace the common ones on that type
    assert all("worker_setup_commands" not in t for t in config["available_node_types"].values())


def pip_installs(command: str) -> list[str]:
    """The package arguments of each `pip install` in a shell command (options and their values,
    `-r FILE`, `-e DIR`, are left out)."""
    packages = []
    for segment in re.split(r"&&|\|\||;|\|", command):
        words = segment.split("#")[0].split()
        if words[:2] != ["pip", "install"]:
            continue
        skip_next = False
        for word in words[2:]:
            if skip_next:
                skip_next = False
            elif word in ("-r", "-e", "-c", "--requirement", "--editable", "--constraint"):
                skip_next = True
            elif not word.startswith("-"):
                packages.append(word.strip("'\""))
    return packages


def test_every_pip_install_is_pinned_and_agrees_with_requirements(config):
    pins = requirement_pins()
    extra = [p for c in all_commands(config) for p in pip_installs(c)]
    assert extra, "the head's extra packages (boto3, tensorboard) are installed by name"
    for package in extra:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\d+(?:\.\d+)+)", package)
        assert m, f"pip install {package}: not pinned to an exact version"
        name, version = m.group(1).lower(), m.group(2)
        assert pins.get(name, version) == version, f"{package}: requirements.txt pins {pins[name]}"


# --- Files --------------------------------------------------------------------------------------


def _git_ignored(path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0


def test_file_mounts_exist_and_are_shipped(config):
    mounts = config["file_mounts"]
    assert mounts[PROJECT_ON_NODE] == ".", "the repository goes to every node"
    for remote, local in mounts.items():
        if remote == TOKEN_PATH:
            continue  # the operator's token: outside the repository (test below)
        path = (ROOT / local).resolve()
        assert path.exists(), f"file_mounts {remote}: {local} does not exist in the repository"
        assert ROOT == path or ROOT in path.parents, f"file_mounts {remote}: {local} is outside the repository"
    # The project is synced with git's ignore rules: .venv, data/ and runs/ stay behind.
    assert ".gitignore" in config["rsync_filter"]
    assert any(".git" in pattern for pattern in config["rsync_exclude"])


def test_files_named_in_commands_exist_and_are_not_filtered_out(config):
    referenced = set()
    for command in all_commands(config):
        referenced |= set(re.findall(re.escape(PROJECT_ON_NODE) + r"/([\w./-]+)", command))
    assert "requirements.txt" in referenced
    for rel in sorted(referenced):
        path = ROOT / rel
        assert path.exists(), f"a command uses {PROJECT_ON_NODE}/{rel}, missing from the repository"
        assert not _git_ignored(path), f"{rel} is git-ignored, so rsync_filter keeps it off the nodes"
    for script in ("scripts/tune.py", "scripts/prepare_coco.py", "pyproject.toml"):
        # what docs/cluster.md runs on the cluster must be shipped too, once it exists
        if (ROOT / script).exists():
            assert not _git_ignored(ROOT / script), script


# --- Token authentication -----------------------------------------------------------------------


def test_token_is_distributed_by_file_mounts_and_never_committed(config):
    local = config["file_mounts"][TOKEN_PATH]
    path = Path(os.path.expanduser(local)).resolve()
    assert not (ROOT == path or ROOT in path.parents) or _git_ignored(path), (
        f"{local}: inside the repository and not ignored"
    )
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    assert not any(name.endswith(b"auth_token") for name in tracked)
    # nothing that looks like a token (Ray's: 64 hex characters) in the config itself
    assert not re.search(r"\b[0-9a-f]{64}\b", CLUSTER_YAML.read_text())


def test_ray_starts_with_token_authentication_on_every_node(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, f"{key}: {command!r} does not enforce token auth"
    assert not any("RAY_AUTH_MODE=disabled" in c for c in all_commands(config))
    # Every command in the containers (`ray exec cluster.yaml 'ray status'`, a job's `ray` calls)
    # runs in token mode: a Ray client without RAY_AUTH_MODE=token sends no token and is refused.
    docker = config["docker"]
    run_options = " ".join(docker.get("run_options", []))
    assert re.search(r"(^|\s)(-e|--env)[ =]RAY_AUTH_MODE=token(\s|$)", run_options), run_options
    for key in ("head_run_options", "worker_run_options"):
        assert "RAY_AUTH_MODE" not in " ".join(docker.get(key, [])), f"docker.{key} overrides the auth mode"


# --- Network exposure ---------------------------------------------------------------------------


def test_no_public_dashboard_or_ray_ports(config):
    # Every node type names its security group: Ray would otherwise create one with SSH open to
    # 0.0.0.0/0 (ray/autoscaler/_private/aws/config.py, _create_default_ssh_inbound_rules).
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
    # Rules the config would add to a group Ray creates: none may be public.
    assert public_exposures(config["provider"].get("security_group", {}).get("IpPermissions", [])) == []
    # The dashboard listens on loopback only (reached through `ray dashboard cluster.yaml`), which
    # is stricter than "not on all interfaces without token auth".
    for command in all_commands(config):
        if "ray start" in command and "--head" in command:
            host = re.search(r"--dashboard-host[= ](\S+)", command)
            assert host and host.group(1) in ("127.0.0.1", "localhost"), f"{command!r}: dashboard not on loopback"
    run_options = " ".join(config["docker"].get("run_options", []))
    assert not re.search(r"(^|\s)(-p|--publish)(\s|=)", run_options), "docker must not publish ports"


def test_exposure_check_flags_public_rules():
    assert public_exposures([{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert public_exposures(
        [{"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    assert public_exposures(
        [{"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 11000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]
    )
    assert public_exposures(
        [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    )
    assert not public_exposures(
        [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}]
    )


def test_security_group_script_opens_only_ssh_from_the_operator():
    out = subprocess.run(
        [str(SECURITY_GROUP_SCRIPT), "--print-rules", "203.0.113.7/32", "sg-0abc"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = json.loads(out)  # exactly what the script passes to authorize-security-group-ingress
    assert public_exposures(rules) == []
    cidr_rules = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")]
    assert cidr_rules == [
        {
            "IpProtocol": "tcp",
            "FromPort": 22,
            "ToPort": 22,
            "IpRanges": [{"CidrIp": "203.0.113.7/32", "Description": "SSH from the operator"}],
        }
    ]
    group_rules = [r for r in rules if r.get("UserIdGroupPairs")]
    assert [p["GroupId"] for r in group_rules for p in r["UserIdGroupPairs"]] == ["sg-0abc"]


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "10.0.0.1", "example.com/32", "::/0"])
def test_security_group_script_refuses_the_internet_and_non_cidrs(cidr):
    run = subprocess.run([str(SECURITY_GROUP_SCRIPT), "--print-rules", cidr], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == "" and "error:" in run.stderr


# --- Layout ---------------------------------------------------------------------------------------


def test_drivers_pinned_to_an_on_demand_head_and_gpu_workers_autoscale(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("sweep_driver", 0) >= 1
    assert "InstanceMarketOptions" not in head["node_config"], "the head (drivers) must be on-demand"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    for name, t in workers.items():
        assert "sweep_driver" not in t["resources"], f"{name}: drivers must not land on a worker"
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1, name
    gpu_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert {"g5.12xlarge", "p4d.24xlarge"} <= gpu_types
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


# --- docs/cluster.md: "Running on a cluster" ------------------------------------------------------


def readme_cluster_commands() -> list[list[str]]:
    """The shell commands of docs/cluster.md, as argv lists: every code block but the JSON ones,
    continuation lines joined, comments dropped."""
    section = (ROOT / "docs" / "cluster.md").read_text()
    assert section.startswith("# Running on a cluster\n")
    commands = []
    for fence in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", section, flags=re.S | re.M):
        lang, block = fence.group(2), fence.group(3)
        if lang == "json":
            continue
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _ray_cli_parse(args: list[str]) -> None:
    """Parses `ray ARGS` as the `ray` command line would (sub-commands, options, arguments),
    without running it: an unknown option or a missing argument fails."""
    from ray.scripts.scripts import cli

    command, name = cli, "ray"
    while isinstance(command, click.Group):
        assert args, f"ray {name}: no sub-command"
        name, args = args[0], args[1:]
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"docs/cluster.md: `ray ... {name}` is not a ray sub-command"
    command.make_context(name, list(args))


def _script_parse(path: str, args: list[str]):
    """The script's own argparse result for ARGS (docs/cluster.md's `python scripts/X.py ARGS`)."""
    spec = importlib.util.spec_from_file_location("readme_" + Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module, module.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"docs/cluster.md: python {path} {' '.join(args)}: refused by its argument parser ({e})")


def test_readme_cluster_commands_match_the_real_command_lines(monkeypatch):
    """Every `ray ...`, `python scripts/...` and `scripts/local_cluster.sh ...` command of the
    section parses with the real CLIs, and the section walks through the whole procedure."""
    monkeypatch.chdir(ROOT)  # the page's commands run from the repository root
    seen = set()
    for words in readme_cluster_commands():
        if words[0] == "ray":
            _ray_cli_parse(words[1:])
            ray_args, entrypoint = words[1:], []
            if "--" in ray_args:  # ray job submit ... -- ENTRYPOINT
                i = ray_args.index("--")
                ray_args, entrypoint = ray_args[:i], ray_args[i + 1 :]
            seen.add(" ".join(ray_args[:2]) if ray_args[0] == "job" else ray_args[0])
            words = entrypoint
        if words[:1] == ["python"] and words[1].startswith("scripts/"):
            module, args = _script_parse(words[1], words[2:])
            seen.add(words[1])
            if words[1] == "scripts/tune.py" and args.data:
                importlib.import_module("detr_ray.cli.tune").load(
                    args
                )  # the search space and every --set override are valid
        elif words and words[0] == "scripts/local_cluster.sh":
            assert words[1:] and words[1] in ("up", "down", "env", "status"), words
            seen.add(" ".join(words[:2]))
    # ray up, shards to S3, the sweep as a job, the dashboard, the results, ray down; the rehearsal
    assert {
        "get-auth-token",
        "up",
        "scripts/prepare_coco.py",
        "dashboard",
        "job submit",
        "scripts/tune.py",
        "exec",
        "scripts/evaluate.py",
        "rsync-down",
        "down",
        "scripts/local_cluster.sh up",
        "scripts/local_cluster.sh down",
    } <= seen, seen


def test_readme_rehearsal_is_the_sweep_the_local_cluster_test_runs():
    """tests/test_local_cluster.py submits docs/cluster.md's rehearsal command; it must be a tiny sweep."""
    submit = [
        w for w in readme_cluster_commands() if w[:3] == ["ray", "job", "submit"] and "/tmp/detr-ray-rehearsal" in w
    ]
    assert len(submit) == 1, submit
    words = submit[0]
    assert words[words.index("--") + 1 :][:2] == ["python", "scripts/tune.py"]
    assert words[3:5] == ["--working-dir", "."]
    assert "--entrypoint-resources" in words  # the sweep's own driver on the head too


def test_readme_cost_section():
    text = (ROOT / "docs" / "cluster.md").read_text()
    cost = text.split("\n## Cost\n", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"GPU-h(ours)? per trial", cost) and "ASHA" in cost


# --- docs/cluster.md: IAM ------------------------------------------------------------------------

WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")


def readme_policies() -> dict[str, list[dict]]:
    """docs/cluster.md's IAM policies: {"worker": statements, "head": the worker's + the head's extra}."""
    section = (ROOT / "docs" / "cluster.md").read_text()
    blocks = [json.loads(m.group(2)) for m in re.finditer(r"^( *)```json\n(.*?)^\1```", section, flags=re.S | re.M)]
    worker = [b for b in blocks if any("s3:ListBucket" in json.dumps(s) for s in b["Statement"])]
    head = [b for b in blocks if any("ec2:RunInstances" in json.dumps(s) for s in b["Statement"])]
    assert len(worker) == 1 and len(head) == 1, blocks
    return {"worker": worker[0]["Statement"], "head": worker[0]["Statement"] + head[0]["Statement"]}


def _glob(pattern: str, value: str) -> bool:
    """IAM's wildcard matching: `*` any run of characters (slashes included), `?` one."""
    return (
        re.fullmatch(".*".join(".".join(map(re.escape, p.split("?"))) for p in pattern.split("*")), value) is not None
    )


def allowed(statements: list[dict], action: str, arn: str) -> bool:
    for s in statements:
        actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s, s
        if any(_glob(a, action) for a in actions) and any(_glob(r, arn) for r in resources):
            return True
    return False


def test_readme_iam_keeps_the_cluster_off_the_shards_and_workers_off_the_sweep_state():
    """A restored sweep unpickles its state on the head: no worker node may write it, and no
    node may change the shards. Prefixes as the section's own commands use them."""
    words = next(w for w in readme_cluster_commands() if "scripts/tune.py" in w and "--storage" in w)
    shards = words[words.index("--data") + 1].removeprefix("s3://BUCKET/")
    sweeps = words[words.index("--storage") + 1].removeprefix("s3://BUCKET/")
    sweep = f"{sweeps}/{words[words.index('--name') + 1]}"
    policies = readme_policies()
    key = "arn:aws:s3:::BUCKET/{}".format
    checkpoint = [
        key(f"{sweep}/runs/TorchTrainer_1a2b3/checkpoint_epoch0003/model.pt"),
        key("runs/detr-r50/checkpoint_epoch0003/model.pt"),
    ]
    sweep_state = [
        key(f"{sweep}/tuner.pkl"),
        key(f"{sweep}/experiment_state-2026-01-01_00-00-00.json"),
        key(f"{sweep}/searcher-state-2026-01-01_00-00-00.pkl"),
        key(f"{sweep}/best.json"),
    ]
    shard = key(f"{shards}/train/shard-00000.parquet")
    for node, statements in policies.items():
        assert allowed(statements, "s3:GetObject", shard), node
        assert not any(allowed(statements, a, shard) for a in WRITES), f"{node} may write the shards"
        assert not any(allowed(statements, a, key("elsewhere/x")) for a in WRITES), f"{node} may write outside"
        for arn in checkpoint:
            assert all(allowed(statements, a, arn) for a in WRITES), (node, arn)
    for arn in sweep_state:
        assert not any(allowed(policies["worker"], a, arn) for a in WRITES), f"workers may write {arn}"
        assert allowed(policies["head"], "s3:PutObject", arn), arn
