"""The nbstripout git filter: notebooks saved with outputs are committed without them.

``.gitattributes`` (committed) routes ``*.ipynb`` through a filter named ``nbstripout`` and diffs
them as ``ipynb``; the commands behind those names live in the clone's ``.git/config``, which git
does not commit, so every clone has to configure them once. ``make venv`` (and ``make hooks``)
do that with :func:`install`, the same settings ``nbstripout --install`` writes, plus
``--keep-id``: the committed notebooks keep their readable cell ids, so they pass through the
filter unchanged.

Outside a git work tree (an unpacked release tarball) :func:`install` does nothing.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

from . import paths

__all__ = ["ATTRIBUTES", "filter_settings", "git_work_tree", "skip_reason", "install", "is_installed"]

# The lines .gitattributes must contain (nbstripout's documented attributes).
ATTRIBUTES = ("*.ipynb filter=nbstripout", "*.ipynb diff=ipynb")


def filter_settings(python: str | None = None) -> dict[str, str]:
    """The git config entries of the filter, running nbstripout with ``python``."""
    strip = f"{shlex.quote(python or sys.executable)} -m nbstripout --keep-id"
    return {
        "filter.nbstripout.clean": strip,
        "filter.nbstripout.smudge": "cat",
        "filter.nbstripout.required": "true",
        "diff.ipynb.textconv": f"{strip} -t",
    }


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)


def git_work_tree(root: Path | None = None) -> Path | None:
    """The top of the git work tree whose root ``root`` is, else None (no git, no repository,
    or ``root`` lies inside some other repository's tree)."""
    root = (root or paths.repo_root()).resolve()
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
    except FileNotFoundError:  # git is not installed
        return None
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        return None
    return root


def _missing_attributes(root: Path) -> list[str]:
    path = root / ".gitattributes"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [a for a in ATTRIBUTES if a not in (line.strip() for line in lines)]


def skip_reason(root: Path | None = None, python: str | None = None) -> str | None:
    """Why :func:`install` would configure nothing (None: it would)."""
    if git_work_tree(root) is None:
        return "not a git clone (no .git at the repository root)"
    if python is None and importlib.util.find_spec("nbstripout") is None:
        # A filter marked required that cannot run would make every `git add` of a notebook fail.
        return "nbstripout is not installed in this Python (it comes with the 'dev' extra)"
    return None


def install(root: Path | None = None, python: str | None = None) -> bool:
    """Configure the nbstripout filter in the clone at ``root`` (default: this checkout).

    Returns False, changing nothing, when :func:`skip_reason` gives a reason. Raises ValueError if
    ``.gitattributes`` does not name the filter (the config alone would do nothing).
    """
    if skip_reason(root, python) is not None:
        return False
    top = git_work_tree(root)
    assert top is not None
    missing = _missing_attributes(top)
    if missing:
        raise ValueError(f"{top / '.gitattributes'}: missing the line(s) {missing}; the filter would not apply")
    for key, value in filter_settings(python).items():
        done = _git(top, "config", "--local", key, value)
        if done.returncode != 0:
            raise RuntimeError(f"git config {key} failed in {top}: {done.stderr.strip()}")
    return True


def is_installed(root: Path | None = None) -> bool:
    """Whether the clone at ``root`` has the filter configured (any Python running nbstripout)."""
    top = git_work_tree(root)
    if top is None:
        return False
    clean = _git(top, "config", "--get", "filter.nbstripout.clean").stdout
    return "nbstripout" in clean and not _missing_attributes(top)
