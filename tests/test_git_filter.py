"""The nbstripout git filter: a notebook saved with outputs is committed without them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from atp_repro import git_filter
from atp_repro import notebook_runner as nr

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def clone(tmp_path: Path, repo_root: Path) -> Path:
    """A fresh git repository holding the project's .gitattributes."""
    repo = tmp_path / "clone"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.name", "Test")
    _git(repo, "config", "user.email", "test@example.invalid")
    shutil.copy(repo_root / ".gitattributes", repo / ".gitattributes")
    return repo


def _commit_notebook_with_outputs(repo: Path, notebook_factory) -> Path:
    path = notebook_factory(repo / "nb.ipynb", outputs=True)
    assert nr.hygiene_problems(path)  # outputs and an execution count in the working file
    _git(repo, "add", ".gitattributes", "nb.ipynb")
    _git(repo, "commit", "-q", "-m", "notebook")
    return path


def test_committed_notebook_is_stripped_working_file_kept(clone: Path, notebook_factory) -> None:
    assert git_filter.install(clone) is True
    assert git_filter.is_installed(clone)
    path = _commit_notebook_with_outputs(clone, notebook_factory)
    committed = json.loads(_git(clone, "show", "HEAD:nb.ipynb"))
    for cell in committed["cells"]:
        assert cell["outputs"] == [] and cell["execution_count"] is None
    assert [c["id"] for c in committed["cells"]] == ["c0", "c1"]  # --keep-id: ids as written
    working = json.loads(path.read_text())
    assert working["cells"][1]["outputs"] and working["cells"][1]["execution_count"] == 3
    blob = clone / "committed.ipynb"
    blob.write_text(json.dumps(committed))
    assert nr.hygiene_problems(blob) == []
    assert _git(clone, "status", "--porcelain") == "?? committed.ipynb\n"  # nb.ipynb counts as clean


def test_without_the_filter_outputs_are_committed(clone: Path, notebook_factory) -> None:
    assert not git_filter.is_installed(clone)
    _commit_notebook_with_outputs(clone, notebook_factory)
    committed = json.loads(_git(clone, "show", "HEAD:nb.ipynb"))
    assert committed["cells"][1]["outputs"]


def test_committed_notebooks_pass_through_the_filter_unchanged(repo_root: Path) -> None:
    """Installing the filter does not make the committed notebooks show up as modified."""
    clean = git_filter.filter_settings()["filter.nbstripout.clean"]
    for notebook in nr.discover_notebooks():
        text = notebook.read_text(encoding="utf-8")
        out = subprocess.run(clean, shell=True, input=text, capture_output=True, text=True, check=True).stdout
        assert out == text, notebook.name


def test_gitattributes_names_the_filter(repo_root: Path) -> None:
    lines = (repo_root / ".gitattributes").read_text().splitlines()
    assert set(git_filter.ATTRIBUTES) <= set(lines)


def test_install_outside_a_git_clone_does_nothing(tmp_path: Path) -> None:
    assert git_filter.skip_reason(tmp_path) == "not a git clone (no .git at the repository root)"
    assert git_filter.install(tmp_path) is False
    assert not (tmp_path / ".git").exists()


def test_install_refuses_a_clone_whose_gitattributes_lacks_the_filter(clone: Path) -> None:
    (clone / ".gitattributes").write_text("*.csv text\n")
    with pytest.raises(ValueError, match=r"\.gitattributes: missing the line"):
        git_filter.install(clone)


def test_make_configures_the_filter_when_setting_up_the_venv(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    for target in (r"\$\(STAMP\)", "hooks"):
        recipe = re.search(rf"^{target}: .*?\n((?:\t.*\n)+)", makefile, re.M)
        assert recipe and "-m atp_repro install-git-filter" in recipe.group(1), target
