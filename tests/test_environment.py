"""pyproject.toml, constraints/ci.txt and environment.yml describe one install; keep them in step.

pip users get constraints/ci.txt, conda users get environment.yml; a pin bumped in one and not the
other means the two populations test different code. Each direct dependency is its own test case
so a failure names the package.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENV = yaml.safe_load((ROOT / "environment.yml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])


def _pins(lines: list[str], source: str) -> dict[str, str]:
    """name -> exact version for every `name==version` line; options and comments skipped."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{source}: {line!r} is not an exact '==' pin"
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def _conda_deps() -> tuple[list[str], list[str]]:
    """(conda specs, pip lines) of environment.yml."""
    conda, pip = [], []
    for dep in ENV["dependencies"]:
        if isinstance(dep, dict):
            pip.extend(dep["pip"])
        else:
            conda.append(dep)
    return conda, pip


def _conda_name(spec: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", spec).group()


def _direct_deps() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    unique = {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != PROJECT}
    return list(unique.values())


CONSTRAINTS = _pins((ROOT / "constraints" / "ci.txt").read_text().splitlines(), "constraints/ci.txt")
CONDA, CONDA_PIP = _conda_deps()
ENV_PINS = _pins(CONDA_PIP, "environment.yml")


@pytest.mark.parametrize("req", _direct_deps(), ids=lambda r: r.name)
def test_dependency_pinned_everywhere(req: Requirement) -> None:
    name = canonicalize_name(req.name)
    ci, conda = CONSTRAINTS.get(name), ENV_PINS.get(name)
    assert ci is not None, f"{req.name}: in pyproject.toml but not pinned in constraints/ci.txt"
    assert conda is not None, f"{req.name}: in pyproject.toml but not pinned in environment.yml (pip section)"
    assert Version(ci) == Version(conda), (
        f"{req.name}: constraints/ci.txt pins {ci} but environment.yml pins {conda}")
    assert req.specifier.contains(ci, prereleases=True), (
        f"{req.name}: pinned {ci} does not satisfy pyproject.toml's '{req}'")


def test_environment_yml_pins_nothing_extra() -> None:
    direct = {canonicalize_name(r.name) for r in _direct_deps()}
    extra = sorted(set(ENV_PINS) - direct)
    assert not extra, f"environment.yml pins packages pyproject.toml does not list: {extra}"


def test_python_version_agrees() -> None:
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    pythons = [d for d in CONDA if _conda_name(d) == "python"]
    assert len(pythons) == 1, f"environment.yml needs exactly one python entry, found {pythons}"
    conda_python = pythons[0].split("=")[-1].strip()
    assert requires.contains(conda_python), (
        f"environment.yml python={conda_python} does not satisfy requires-python '{requires}'")
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert f"python{conda_python}" in ci_run, f".ci/run does not build its venv with python{conda_python}"


def test_conda_has_ffmpeg_and_installs_the_project() -> None:
    assert any(_conda_name(d) == "ffmpeg" for d in CONDA), (
        "environment.yml: ffmpeg missing from conda dependencies (torchcodec needs it)")
    assert "-e .[dev]" in CONDA_PIP, "environment.yml: pip section must install the project with '-e .[dev]'"
