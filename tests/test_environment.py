"""environment.yml (Conda users) installs exactly what requirements.txt pins."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _conda_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip section"
    return [str(p).strip() for p in pip[0]]


def test_every_pin_agrees_with_requirements():
    req, conda = _requirements(), _conda_pip()
    assert all("==" in r for r in req), "requirements.txt pins exact versions"
    missing = sorted(set(req) - set(conda))
    extra = sorted(set(conda) - set(req))
    assert not missing and not extra, f"environment.yml lacks {missing}, has unpinned extras {extra}"


def test_conda_python_is_the_tested_one():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
