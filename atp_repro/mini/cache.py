"""Content-addressed artifact cache for trained mini-world models.

An artifact is a folder ``<root>/<name>-<hash12>/`` holding ``model.pt`` (a state dict), the
tokenizer and ``manifest.json``. The hash is the SHA-256 of the canonical JSON of the artifact's
*spec* (every config that determines the result, a fingerprint of the generated training data,
the parent artifact's hash and :data:`CACHE_VERSION`). The manifest is written last, atomically,
and stores the spec and the SHA-256 of every file, so

* a half-written artifact has no manifest and is rebuilt;
* a corrupted file (hash mismatch) or a manifest whose spec differs from the request raises
  :class:`ArtifactError` in :func:`verify_artifact`; :func:`load_or_build` reports it with a
  warning, deletes the folder and rebuilds. A bad artifact is never silently used.

Building is serialised per key with a file lock (``filelock``) in ``<root>/.locks``: a second
process asking for an artifact that another process is building waits, then loads it.

The root is ``<repo>/.cache/atp-repro`` (git-ignored), or ``$ATP_REPRO_CACHE`` if set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from ..paths import atomic_write_bytes  # the project's one atomic writer
from ..provenance import note_artifact

CACHE_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """A cached artifact is corrupted or does not match the requested spec."""


def _repo_root() -> Path:
    try:  # the foundation's helper, once it exists
        from atp_repro.paths import repo_root  # type: ignore

        return Path(repo_root())
    except Exception:
        here = Path(__file__).resolve()
        for parent in here.parents:
            if (parent / ".git").exists() or (parent / "pyproject.toml").exists():
                return parent
        return here.parents[2]


def cache_root() -> Path:
    env = os.environ.get("ATP_REPRO_CACHE")
    return Path(env) if env else _repo_root() / ".cache" / "atp-repro"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(canonical_json({"cache_version": CACHE_VERSION, "spec": spec}).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through the project's atomic writer (temp file, fsync, rename over ``path``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def artifact_dir(name: str, spec: dict, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{name}-{spec_hash(spec)[:12]}"


def write_manifest(folder: Path, spec: dict, extra: dict | None = None) -> dict:
    """Hash every file in ``folder`` (except the manifest) and write the manifest atomically."""
    files = {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        and "partial" not in p.relative_to(folder).parts
    }
    manifest = {"spec": spec, "spec_hash": spec_hash(spec), "files": files, **(extra or {})}
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return manifest


def verify_artifact(folder: Path, spec: dict) -> dict:
    """Return the manifest if ``folder`` is a complete, intact artifact for ``spec``; else raise."""
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{folder}: no manifest (incomplete artifact)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{folder}: manifest is not valid JSON ({e})") from e
    if manifest.get("spec_hash") != spec_hash(spec) or canonical_json(manifest.get("spec")) != canonical_json(
        json.loads(canonical_json(spec))
    ):
        raise ArtifactError(f"{folder}: manifest spec does not match the requested config")
    for rel, digest in manifest.get("files", {}).items():
        p = folder / rel
        if not p.exists():
            raise ArtifactError(f"{folder}: missing file {rel}")
        if file_sha256(p) != digest:
            raise ArtifactError(f"{folder}: checksum mismatch for {rel} (corrupted)")
    return manifest


def load_or_build(
    name: str,
    spec: dict,
    build: Callable[[Path], dict | None],
    *,
    root: Path | None = None,
    rebuild_corrupt: bool = True,
    rebuild: bool = False,
) -> tuple[Path, dict, str]:
    """Return ``(folder, manifest, status)``; status is ``"hit"``, ``"built"`` or ``"rebuilt"``.

    ``build(folder)`` must write the artifact's files into ``folder`` (it may resume from files it
    left there earlier) and may return extra manifest fields (metrics, wall-time). ``rebuild=True``
    discards a stored artifact (under the lock) and builds it again.
    """
    folder = artifact_dir(name, spec, root)
    lock_dir = folder.parent / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"atp-repro: another process is building {folder.name}; waiting for it", flush=True)
        lock.acquire()
    try:
        if rebuild and folder.exists():
            shutil.rmtree(folder)
        folder, manifest, status = _load_or_build_locked(folder, spec, build, rebuild_corrupt)
    finally:
        lock.release()
    note_artifact(folder.name, manifest.get("files", {}))  # named in the provenance of what uses it
    return folder, manifest, status


def _load_or_build_locked(folder: Path, spec: dict, build: Callable[[Path], dict | None],
                          rebuild_corrupt: bool) -> tuple[Path, dict, str]:
    status = "built"
    if (folder / MANIFEST).exists():
        try:
            return folder, verify_artifact(folder, spec), "hit"
        except ArtifactError as e:
            if not rebuild_corrupt:
                raise
            warnings.warn(f"discarding cached artifact: {e}; rebuilding", stacklevel=3)
            shutil.rmtree(folder)
            status = "rebuilt"
    folder.mkdir(parents=True, exist_ok=True)
    extra = build(folder) or {}
    manifest = write_manifest(folder, spec, extra)
    return folder, manifest, status
