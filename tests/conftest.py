"""Shared fixtures of the foundation tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from atp_repro import paths

SUPPLEMENTARY_ENV = "ATP_REPRO_SUPPLEMENTARY"
SPEC_ENV = "ATP_REPRO_SPEC"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return paths.repo_root()


def _shared_file(env: str, relative: str) -> Path | None:
    """A file of the read-only shared/ folder: $env, else <repo>/../shared/<relative>."""
    candidate = Path(os.environ[env]) if os.environ.get(env) else None
    if candidate is None:
        candidate = paths.repo_root().parent / "shared" / relative
    return candidate if candidate.is_file() else None


@pytest.fixture(scope="session")
def supplementary_text() -> str:
    """Text of the paper's supplementary (skips the test if the shared copy is absent)."""
    path = _shared_file(SUPPLEMENTARY_ENV, "seed/ATP-LLaVA-supplementary.txt")
    if path is None:
        pytest.skip(f"supplementary text not found (set {SUPPLEMENTARY_ENV})")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def spec_text() -> str:
    """Text of SPEC.md, where the main paper's Table 1 and Table 6 facts are given."""
    path = _shared_file(SPEC_ENV, "SPEC.md")
    if path is None:
        pytest.skip(f"SPEC.md not found (set {SPEC_ENV})")
    return path.read_text(encoding="utf-8")


def make_notebook(
    path: Path,
    *,
    parameters: str = 'output_dir = ""\n',
    body: tuple[str, ...] = ("x = 1",),
    tag: bool = True,
    kernel: str = "python3",
    outputs: bool = False,
) -> Path:
    """Write a small notebook (nbformat 4.5) for hygiene and runner tests."""
    cells = []
    for i, source in enumerate((parameters, *body)):
        cell = {
            "cell_type": "code",
            "id": f"c{i}",
            "metadata": {"tags": ["parameters"]} if (i == 0 and tag) else {},
            "execution_count": None,
            "outputs": [],
            "source": source,
        }
        if outputs and i == 1:
            cell["execution_count"] = 3
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hi\n"}]
        cells.append(cell)
    nb = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": kernel},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def fake_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty atp-repro-like checkout in tmp_path, made the repo root via ATP_REPRO_ROOT."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "atp-repro"\n')
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setenv(paths.ROOT_ENV_VAR, str(tmp_path))
    return tmp_path


@pytest.fixture
def notebook_factory():
    """``notebook_factory(path, **options)`` writes a small notebook; see :func:`make_notebook`."""
    return make_notebook
