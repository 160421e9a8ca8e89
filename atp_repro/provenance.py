"""Run provenance: what produced a result, written next to it as a JSON sidecar.

Every result file ``tables/<name>.csv`` (or ``figures/<name>.png``) gets
``<name>.provenance.json`` with the run id, the configuration, the git commit, package versions,
device, dtype, attention backend, seed, wall-time and the SHA-256 of each output. Timestamps
and run ids live only here, never in the tables, so two identical runs give identical tables.

Usage, in one block::

    with track_run("supp_table6_sweep", config=cfg.to_dict(), seed=0) as run:
        ...  # compute and write outputs
        run.add_output(path)                     # hashed into the sidecar
        run.record(attention_backend="sdpa")     # anything else worth keeping

or across notebook cells: ``run = start_run(...)`` in the first cell after the parameters,
``run.finish()`` in the last one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from atp_repro import paths

__all__ = [
    "TRACKED_PACKAGES",
    "RunRecord",
    "new_run_id",
    "git_info",
    "package_versions",
    "device_info",
    "environment_info",
    "file_sha256",
    "start_run",
    "track_run",
    "write_provenance",
]

TRACKED_PACKAGES = (
    "atp-repro",
    "torch",
    "transformers",
    "accelerate",
    "deepspeed",
    "flash-attn",
    "numpy",
    "pandas",
    "matplotlib",
    "seaborn",
    "papermill",
    "nbval",
    "pyyaml",
    "safetensors",
)


def new_run_id(name: str) -> str:
    """``<name>-<UTC time>-<random hex>``: unique per invocation, sortable by time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{uuid.uuid4().hex[:8]}"


def git_info(root: Path | None = None) -> dict[str, Any]:
    """Commit, branch and whether tracked files differ from the commit (``None`` if no git)."""
    root = root or paths.repo_root()

    def git(*args: str, timeout: float = 10) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                                 check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    # The first status of a fresh checkout runs the notebooks' nbstripout filter once per notebook
    # (about 1 s each): give it time; later calls are fast.
    status = git("status", "--porcelain", "--untracked-files=no", timeout=180)
    return {
        "commit": commit,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD") if commit else None,
        "dirty": None if status is None else bool(status),
    }


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (``None`` if not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info() -> dict[str, Any]:
    """CPU/GPU description and thread count (torch is imported only if already installed)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch
    except ImportError:
        info["device"] = "cpu"
        return info
    info["torch_threads"] = torch.get_num_threads()
    from . import numerics

    info["numerics"] = numerics.state()
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    return info


def cpuinfo_field(name: str, path: str | Path = "/proc/cpuinfo") -> str | None:
    """The first ``name`` entry of /proc/cpuinfo ("model name", "vendor_id", ...); None where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or "unknown"


# Trained artifacts this process loaded or built (folder name -> {weights file: SHA-256}); the cache
# reports each one (:func:`note_artifact`) and every sidecar written afterwards lists them, so that a
# table names the exact weights it was computed from and ``atp-repro verify`` can tell "other
# weights" from "other numbers from the same weights".
_ARTIFACTS: dict[str, dict[str, str]] = {}


def note_artifact(name: str, files: Mapping[str, str]) -> None:
    """Record that this process used the artifact ``name`` (a cache folder name) with these files'
    SHA-256; only weights files (``*.pt``) are kept. An artifact without weights is not recorded."""
    weights = {rel: digest for rel, digest in sorted(files.items()) if rel.endswith(".pt")}
    if weights:
        _ARTIFACTS[name] = weights


def artifacts_used() -> dict[str, dict[str, str]]:
    """The trained artifacts this process used so far, by folder name (see :func:`note_artifact`)."""
    return {name: dict(files) for name, files in sorted(_ARTIFACTS.items())}


def environment_info() -> dict[str, Any]:
    """Everything about the machine and software, for ``atp-repro info`` and the sidecars."""
    return {"git": git_info(), "packages": package_versions(), "device": device_info()}


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RunRecord:
    """Mutable record of one run; :func:`track_run` fills and writes it."""

    name: str
    run_id: str
    config: Mapping[str, Any] | None = None
    parameters: Mapping[str, Any] | None = None
    seed: int | None = None
    dtype: str | None = None
    attention_backend: str | None = None
    started_at: str = ""
    finished_at: str = ""
    wall_time_s: float | None = None
    status: str = "running"
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _start: float = field(default=0.0, repr=False)
    _sidecar: Path | None = field(default=None, repr=False)

    def add_output(self, path: str | os.PathLike[str]) -> None:
        """Register an output file; its SHA-256 is taken when the run finishes."""
        self.outputs[str(Path(path))] = ""

    def record(self, **values: Any) -> None:
        """Store further facts (attention backend actually used, thread count, ...)."""
        for key in ("dtype", "attention_backend", "seed"):
            if key in values:
                setattr(self, key, values.pop(key))
        self.extra.update(values)

    def finish(self, status: str = "ok") -> Path:
        """Stop the clock, hash the registered outputs and write the sidecar (atomically)."""
        if self._sidecar is None:
            raise RuntimeError("finish() needs a run started with start_run() or track_run()")
        self.status = status
        self.wall_time_s = round(time.perf_counter() - self._start, 3)
        self.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for p in self.outputs:
            self.outputs[p] = file_sha256(p) if Path(p).is_file() else "missing"
        return write_provenance(self, self._sidecar)

    def to_dict(self) -> dict[str, Any]:
        root = paths.repo_root()
        outputs = {}
        for p, digest in self.outputs.items():
            path = Path(p)
            shown = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            outputs[shown] = digest
        env = environment_info()
        return {
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "wall_time_s": self.wall_time_s,
            "seed": self.seed,
            "dtype": self.dtype,
            "attention_backend": self.attention_backend,
            "parameters": _jsonable(self.parameters),
            "config": _jsonable(self.config),
            "git": env["git"],
            "packages": env["packages"],
            "device": env["device"],
            "command": sys.argv,
            "outputs": outputs,
            "artifacts": artifacts_used(),
            "extra": _jsonable(self.extra),
        }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str)) if obj is not None else None


def write_provenance(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Write ``record`` as pretty JSON, atomically."""
    text = json.dumps(record.to_dict(), indent=2, sort_keys=False) + "\n"
    return paths.atomic_write_text(path, text)


def start_run(
    name: str,
    *,
    config: Mapping[str, Any] | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    sidecar: str | os.PathLike[str] | None = None,
) -> RunRecord:
    """Start timing a run that spans several notebook cells; end it with
    :meth:`RunRecord.finish`, which writes ``tables/<name>.provenance.json``."""
    record = RunRecord(name=name, run_id=new_run_id(name), config=config, parameters=parameters, seed=seed)
    record.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record._start = time.perf_counter()
    record._sidecar = Path(sidecar) if sidecar else paths.tables_dir(output_dir) / f"{name}.provenance.json"
    return record


@contextmanager
def track_run(
    name: str,
    *,
    config: Mapping[str, Any] | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    sidecar: str | os.PathLike[str] | None = None,
) -> Iterator[RunRecord]:
    """Time a block and write its provenance to ``tables/<name>.provenance.json``.

    The sidecar is written also when the block raises (``status: "failed"``), then the error
    propagates. Outputs registered with :meth:`RunRecord.add_output` are hashed at the end.
    """
    record = start_run(name, config=config, parameters=parameters, seed=seed, output_dir=output_dir, sidecar=sidecar)
    try:
        yield record
    except BaseException:
        record.finish("failed")
        raise
    record.finish("ok")
