"""Packaging: pyproject, environment.yml, Makefile and CI agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11


@pytest.fixture(scope="module")
def pyproject(repo_root: Path) -> dict:
    return tomllib.loads((repo_root / "pyproject.toml").read_text())


def test_extras_and_entry_point(pyproject: dict) -> None:
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("deepspeed") for d in extras["train"])
    assert any(d.startswith("flash-attn") for d in extras["gpu"])
    assert not any("flash-attn" in d for d in project["dependencies"])  # optional only
    for tool in ("pytest", "nbstripout", "ruff"):
        assert any(d.startswith(tool) for d in extras["dev"])
    for dep in ("torch", "transformers", "pandas", "seaborn", "papermill", "nbval", "jupyterlab", "pyyaml"):
        assert any(d.lower().startswith(dep) for d in project["dependencies"]), dep
    assert project["scripts"]["atp-repro"] == "atp_repro.cli:main"
    assert project["requires-python"] == ">=3.10"
    assert "slow" in " ".join(pyproject["tool"]["pytest"]["ini_options"]["markers"])


def test_environment_yml_installs_the_package(repo_root: Path) -> None:
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    assert tuple(int(x) for x in python.split("=")[1].split(".")[:2]) >= (3, 10)
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e .[train,dev]" in pip and any(p.startswith("torch") for p in pip)


def test_makefile_pins_cpu_torch_in_the_same_pip_step(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    assert re.search(r"^TORCH_SPEC\s*\?=\s*torch==2\.13\.0$", makefile, re.M)
    install = [line for line in makefile.splitlines() if "pip install" in line]
    assert len(install) == 1
    assert "$(TORCH_SPEC)" in install[0] and "-e '.[$(EXTRAS)]'" in install[0]
    assert "DS_BUILD_OPS=0" in install[0]
    assert re.search(r"^EXTRAS\s*\?=\s*train,dev$", makefile, re.M)
    for target in ("help", "reproduce", "test", "lab", "smoke", "lint", "clean"):
        assert re.search(rf"^{target}:.*## ", makefile, re.M), target
    assert re.search(r"^\$\(STAMP\): pyproject.toml$", makefile, re.M)


def test_ci_runs_the_readme_command(repo_root: Path) -> None:
    ci = (repo_root / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line and not line.startswith("#")]
    assert commands[0] == "set -euo pipefail" and commands[-1] == "make test"
    readme = (repo_root / "README.md").read_text()
    assert "make test" in readme and "make reproduce" in readme


def test_license_is_apache(repo_root: Path) -> None:
    assert "Apache License" in (repo_root / "LICENSE").read_text()[:200]


def test_make_test_runs_the_browser_test_and_ci_requires_it(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    recipe = re.search(r"^test: .*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert '-m "not slow and not browser"' in recipe and "-m browser -rA" in recipe  # -rA: its result is printed
    ci = (repo_root / ".ci" / "run").read_text()
    assert "apt-get install" in ci and "chromium" in ci and "export ATP_REPRO_REQUIRE_BROWSER=1" in ci
