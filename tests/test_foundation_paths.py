"""Repository-root resolution and atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from atp_repro import paths


def test_repo_root_holds_the_project(repo_root: Path) -> None:
    assert (repo_root / "pyproject.toml").is_file()
    assert (repo_root / "atp_repro" / "paths.py").is_file()


def test_repo_root_is_independent_of_the_working_directory(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(paths.ROOT_ENV_VAR, raising=False)
    for cwd in (repo_root / "notebooks", tmp_path):  # nbval / papermill / elsewhere
        monkeypatch.chdir(cwd)
        assert paths.repo_root() == repo_root


def test_root_env_var_must_point_at_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(paths.ROOT_ENV_VAR, str(tmp_path))
    with pytest.raises(paths.RepoRootNotFoundError, match=paths.ROOT_ENV_VAR):
        paths.repo_root()


def test_resolve_and_output_folders(fake_repo: Path) -> None:
    assert paths.resolve("configs/x.yaml") == fake_repo / "configs/x.yaml"
    assert paths.resolve("/abs/file") == Path("/abs/file")
    assert paths.output_root("") == fake_repo
    assert paths.output_root(None) == fake_repo
    assert paths.tables_dir() == fake_repo / "tables"
    assert paths.tables_dir("build/notebooks/smoke") == fake_repo / "build/notebooks/smoke/tables"
    assert paths.figures_dir("out").is_dir()


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    paths.atomic_write_text(target, "first\n")
    paths.atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    paths.atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        paths.atomic_write_bytes(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
