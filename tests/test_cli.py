"""`detr-ray <command>` (detr_ray/cli/main.py, installed by pyproject.toml) runs the same programs as
scripts/<file>.py, and pyproject.toml declares what the code imports, in ranges that hold
requirements.txt's tested pins."""

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from detr_ray.cli.main import COMMANDS
from tests.data.conftest import make_coco

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _script(module: str):
    spec = importlib.util.spec_from_file_location(f"script_{module}", ROOT / "scripts" / f"{module}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_help_lists_every_command():
    run = _run("-m", "detr_ray.cli", "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: detr-ray")
    listed = [line.split()[0] for line in run.stdout.split("commands:\n", 1)[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS) and {"prepare", "train", "tune", "evaluate"} <= set(listed)
    unknown = _run("-m", "detr_ray.cli", "fit")
    assert unknown.returncode == 2 and "invalid choice: 'fit'" in unknown.stderr


def test_the_console_script_is_the_dispatcher_and_each_script_wraps_its_command():
    target = PYPROJECT["project"]["scripts"]["detr-ray"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is importlib.import_module("detr_ray.cli.main").main
    for command, (module, _summary) in COMMANDS.items():
        cli = importlib.import_module(f"detr_ray.cli.{module}")
        script = _script(module)
        assert (script.main, script.parse_args) == (cli.main, cli.parse_args), command
        assert cli.__doc__ and cli.parse_args.__module__ == cli.__name__, command


def test_command_help_is_the_scripts_help_under_its_command_name(capsys, monkeypatch):
    from detr_ray.cli.main import main as detr_ray

    monkeypatch.setattr(sys, "argv", ["scripts/tune.py"])  # as `python scripts/tune.py --help` starts
    helps = []
    for run in (_script("tune").main, lambda argv: detr_ray(["tune", *argv])):
        with pytest.raises(SystemExit) as exit:
            run(["--help"])
        assert exit.value.code == 0
        helps.append(capsys.readouterr().out)
    script, dispatched = helps
    assert script.startswith("usage: tune.py ") and dispatched.startswith("usage: detr-ray tune ")
    # the same options and description; only the program name (and so the usage line's wrapping) differs
    assert dispatched.split("\n\n", 1)[1] == script.split("\n\n", 1)[1]
    assert "Tune DETR's hyperparameters" in dispatched and "--num-samples" in dispatched


def test_prepare_through_the_dispatcher_does_what_the_script_does(tmp_path, capsys, monkeypatch):
    from detr_ray.cli.main import main as detr_ray

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the dispatcher names the command in sys.argv[0]
    coco = make_coco(tmp_path / "coco")
    args = [
        "--images",
        str(tmp_path / "coco" / "images"),
        "--annotations",
        str(tmp_path / "coco" / "instances.json"),
        "--workers",
        "0",
        "--no-progress",
        "--out",
    ]
    printed = {}
    for how, run in (("script", _script("prepare_coco").main), ("dispatcher", lambda a: detr_ray(["prepare", *a]))):
        assert run([*args, str(tmp_path / how)]) == 0
        printed[how] = capsys.readouterr().out.replace(str(tmp_path / how), "OUT")
        # a refusal: the same exit code and message
        assert (
            run(["--images", "x", "--annotations", str(tmp_path / "missing.json"), "--out", str(tmp_path / "no")]) == 2
        )
        assert "missing.json" in capsys.readouterr().err
    assert printed["script"] == printed["dispatcher"] and f"{len(coco['images'])} images" in printed["script"]
    meta = [json.loads((tmp_path / how / "_meta.json").read_text()) for how in ("script", "dispatcher")]
    assert meta[0] == meta[1]


# --- pyproject.toml's dependencies --------------------------------------------------------------


def _declared() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    every = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in every}


def _third_party_imports() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "detr_ray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "detr_ray":
                    found.setdefault(top, path.relative_to(ROOT))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    """Each module imported in detr_ray/ comes from a distribution that pyproject.toml declares, or
    that a declared one (with its extras) requires, so `pip install .` is enough to run it."""
    runtime = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    provided = {req.name.lower() for req in runtime}
    for req in runtime:
        name = req.name
        for dep in map(Requirement, importlib.metadata.requires(name) or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                provided.add(dep.name.lower().replace("_", "-"))
    distributions = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "ray", "optuna", "pycocotools", "pyarrow"} <= set(imports)
    for module, path in imports.items():
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert dists & provided, (
            f"{path} imports {module} (from {sorted(dists)}), which pyproject.toml does not declare"
        )


def test_every_requirements_pin_lies_in_its_pyproject_range():
    declared = _declared()
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = [Requirement(line) for line in lines if line]
    assert {p.name.lower() for p in pins} == set(declared), "requirements.txt and pyproject.toml name the same packages"
    for pin in pins:
        (version,) = [s.version for s in pin.specifier]
        req = declared[pin.name.lower()]
        assert req.specifier.contains(version), f"requirements.txt {pin}: outside pyproject.toml's {req}"
        assert set(pin.extras) == set(req.extras), f"{pin.name}: extras {sorted(pin.extras)} vs {sorted(req.extras)}"


def test_the_package_list_names_every_subpackage():
    """pyproject.toml lists the packages (for the search spaces' package-dir): a new subpackage
    must be added there, or `pip install .` would leave it out."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "detr_ray").rglob("__init__.py")}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found | {"detr_ray.search_spaces"}


@pytest.mark.timeout(300)
def test_a_built_wheel_carries_the_search_spaces_and_runs_without_the_checkout(tmp_path):
    """`pip install .` (not editable): the default demo space and the demo experiment come from
    the wheel's package data; the process runs outside the checkout, with the wheel's files first."""
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("detr_ray", "search_spaces"):
        shutil.copytree(ROOT / part, source / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", source / "pyproject.toml")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("detr_ray-*.whl")

    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    assert sorted(p.name for p in (unpacked / "detr_ray" / "search_spaces").glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "search_spaces").glob("*.yaml")
    )
    code = (
        "import json, detr_ray\n"
        "from detr_ray.cli.tune import DEFAULT_SPACE\n"
        "from detr_ray.train.trainer import demo_experiment\n"
        "print(json.dumps([detr_ray.__file__, DEFAULT_SPACE, demo_experiment()['train']['epochs']]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    package_file, space, epochs = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(package_file).is_relative_to(unpacked)
    assert Path(space) == unpacked / "detr_ray" / "search_spaces" / "demo.yaml"
    assert epochs == 8  # search_spaces/demo.yaml's
