"""Repository-root-relative paths and atomic file writes.

Notebooks are executed by papermill (working directory: the repo root), by nbval (working
directory: the folder of the executed copy) and interactively in JupyterLab (working directory:
``notebooks/``). Every path in this package is therefore resolved from the repository root, never
from the current working directory.

The root is found, in order, from

1. the ``ATP_REPRO_ROOT`` environment variable,
2. the current working directory or one of its parents,
3. the location of this package (an editable install lives inside the repository),

where a directory counts as the root if its ``pyproject.toml`` declares ``name = "atp-repro"``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ROOT_ENV_VAR",
    "CACHE_ENV_VAR",
    "RepoRootNotFoundError",
    "repo_root",
    "resolve",
    "output_root",
    "tables_dir",
    "figures_dir",
    "build_dir",
    "cache_dir",
    "notebooks_dir",
    "configs_dir",
    "paper_dir",
    "atomic_write_text",
    "atomic_write_bytes",
]

ROOT_ENV_VAR = "ATP_REPRO_ROOT"
CACHE_ENV_VAR = "ATP_REPRO_CACHE"
_PROJECT_MARKER = 'name = "atp-repro"'


class RepoRootNotFoundError(RuntimeError):
    """Raised when no atp-repro checkout can be located."""


def _is_repo_root(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    try:
        return _PROJECT_MARKER in pyproject.read_text(encoding="utf-8")
    except OSError:
        return False


def _with_parents(path: Path) -> Iterator[Path]:
    path = path.resolve()
    yield path
    yield from path.parents


def repo_root() -> Path:
    """Return the absolute path of the atp-repro repository root.

    Raises:
        RepoRootNotFoundError: if ``ATP_REPRO_ROOT`` points elsewhere than a checkout, or no
            checkout contains the working directory or this package.
    """
    env = os.environ.get(ROOT_ENV_VAR)
    if env:
        candidate = Path(env).expanduser().resolve()
        if not _is_repo_root(candidate):
            raise RepoRootNotFoundError(
                f"{ROOT_ENV_VAR}={env!r} is not an atp-repro checkout "
                f"(expected a pyproject.toml containing {_PROJECT_MARKER!r})"
            )
        return candidate
    for start in (Path.cwd(), Path(__file__).parent):
        for candidate in _with_parents(start):
            if _is_repo_root(candidate):
                return candidate
    raise RepoRootNotFoundError(
        "cannot find the atp-repro repository root from the working directory "
        f"({Path.cwd()}) or the package location ({Path(__file__).parent}); "
        f"set {ROOT_ENV_VAR} to the checkout"
    )


def resolve(path: str | os.PathLike[str]) -> Path:
    """Resolve ``path`` against the repository root (absolute paths are returned unchanged)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def output_root(output_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder that receives ``tables/`` and ``figures/``.

    ``None`` or ``""`` means the repository root (what ``make reproduce`` fills); any other value
    is resolved from the root, e.g. ``"build/notebooks/smoke"`` for CI runs.
    """
    if output_dir is None or str(output_dir) == "":
        return repo_root()
    return resolve(output_dir)


def tables_dir(output_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<output root>/tables`` (created if missing)."""
    return _ensure(output_root(output_dir) / "tables")


def figures_dir(output_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<output root>/figures`` (created if missing)."""
    return _ensure(output_root(output_dir) / "figures")


def build_dir() -> Path:
    """Git-ignored folder for executed notebooks and other build products."""
    return _ensure(repo_root() / "build")


def cache_dir() -> Path:
    """Cache for trained artifacts (``$ATP_REPRO_CACHE`` or ``<root>/.cache/atp-repro``)."""
    env = os.environ.get(CACHE_ENV_VAR)
    return _ensure(Path(env).expanduser() if env else repo_root() / ".cache" / "atp-repro")


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def configs_dir() -> Path:
    return repo_root() / "configs"


def paper_dir() -> Path:
    return repo_root() / "paper"


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    Readers never see a half-written file, and an interrupted run leaves the old file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically, with ``\\n`` line endings."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` resolved, checked *before* any work that ends by writing it: not a directory, and its
    folder exists and is writable. Raises ValueError naming ``option``."""
    target = resolve(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: folder {folder} is not writable")
    return target
