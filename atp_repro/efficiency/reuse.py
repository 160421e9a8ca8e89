"""Timing measurements kept like trained artifacts: a warm ``make reproduce`` reuses them.

A benchmark's result is stored in the artifact cache (:mod:`atp_repro.mini.cache`: checksummed,
written atomically, one builder per key) under a key made of

* what was measured: the benchmark's name and its config;
* where: processor (or CUDA device) name, core count, torch thread count, the numerics in effect
  (:func:`atp_repro.numerics.cache_key`), and the versions of Python, torch and transformers;
* the code that measured: SHA-256 of the sources of ``atp_repro.efficiency``, ``atp_repro.atp`` and
  ``atp_repro/baselines.py`` (or of the parts named by ``code``: Table 4's grid cost times mini-world
  training).

Any change to one of them measures again; so does ``remeasure=True`` (the notebooks' ``remeasure``
parameter), which replaces the stored result (if measuring again fails, nothing is stored). A reused
result is an unpickled copy of what the measurement returned, so a second run of a notebook gives the
same tables; :func:`describe` says when and under what load it was measured.

    >>> m = measured("generation", config.to_dict(), lambda: run_generation_benchmark(config))
    >>> m.result, m.status    # status: "measured" or "reused"
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from atp_repro.mini.cache import load_or_build
from atp_repro.paths import atomic_write_bytes

from .machine import _load1

T = TypeVar("T")
RESULT = "result.pkl"
# Parts of atp_repro (subpackages or modules) whose sources are part of a key by default.
TIMING_CODE = ("efficiency", "atp", "baselines.py")


def code_hash(parts: tuple[str, ...] = TIMING_CODE) -> str:
    """SHA-256 over the sources of the parts of atp_repro (a subpackage, all its modules at any depth,
    or one module ``name.py``) that build the timed models and time them."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for part in parts:
        path = root / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else None
        if not files:
            raise ValueError(f"code: {part!r} is not a subpackage or module of atp_repro")
        for file in files:
            digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def machine_key() -> dict[str, Any]:
    """What identifies the machine a timing belongs to (from the provenance's own readers)."""
    from atp_repro import numerics
    from atp_repro.provenance import device_info, package_versions

    info = device_info()
    return {"processor": info["processor"], "cpu_count": info["cpu_count"], "gpus": info.get("gpus"),
            "threads": torch.get_num_threads(), "numerics": numerics.cache_key(),
            **package_versions(("torch", "transformers"))}


def measurement_spec(kind: str, config: dict[str, Any], code: tuple[str, ...] = TIMING_CODE) -> dict[str, Any]:
    return {"kind": "timing", "benchmark": kind, "config": config, "machine": machine_key(),
            "code": {"packages": list(code), "sha256": code_hash(code)}}


@dataclass
class Measurement(Generic[T]):
    result: T
    status: str  # "measured" (this call) or "reused" (stored by an earlier call)
    measured_at: str  # UTC, ISO 8601
    load1: float | None  # 1-minute load average when the measurement finished
    folder: Path


def measured(kind: str, config: dict[str, Any], measure: Callable[[], T], *, remeasure: bool = False,
             code: tuple[str, ...] = TIMING_CODE, threads: int | None = None) -> Measurement[T]:
    """The stored result of ``measure()`` for ``kind`` and ``config`` on this machine and code (the
    parts ``code`` of atp_repro), measuring (and storing) it if there is none or ``remeasure`` is true.

    ``threads``: the torch thread count the measurement runs with, set before the key is made (None:
    the process's current count, which is then what the measurement uses, unless it sets its own;
    pass it whenever the measurement does, so that a warm run finds what a cold run stored).
    """
    if not isinstance(remeasure, bool):
        raise ValueError(f"remeasure must be True or False, got {remeasure!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        torch.set_num_threads(threads)
    spec = measurement_spec(kind, config, code)
    fresh = []

    def build(folder: Path) -> dict[str, Any]:
        result = measure()
        atomic_write_bytes(folder / RESULT, pickle.dumps(result))
        fresh.append(result)
        return {"measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "load1": _load1()}

    folder, manifest, _ = load_or_build("timing", spec, build, rebuild=remeasure)
    if fresh:
        result, status = fresh[0], "measured"
    else:
        result, status = pickle.loads((folder / RESULT).read_bytes()), "reused"
    return Measurement(result, status, str(manifest.get("measured_at", "")), manifest.get("load1"), folder)


def describe(m: Measurement) -> str:
    """One line for a notebook: measured now or reused, when, and the load average then."""
    load = "" if m.load1 is None else f", load average {m.load1:.2f} when it finished"
    if m.status == "measured":
        return f"measured in this run ({m.measured_at}{load}); stored as {m.folder.name}"
    return (f"reused from {m.measured_at} ({m.folder.name}, same machine, config and code{load}); "
            "run with remeasure=True to measure again")


def provenance(*measurements: Measurement) -> dict[str, dict[str, Any]]:
    """For a run's provenance sidecar: each measurement's stored folder, whether this run measured or
    reused it, and when it was measured."""
    return {m.folder.name: {"status": m.status, "measured_at": m.measured_at, "load1": m.load1}
            for m in measurements}
