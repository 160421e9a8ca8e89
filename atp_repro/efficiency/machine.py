"""What the machine was doing while a timing ran: load, CPU time, contention, and peak memory.

Timings on a shared CPU are only as good as the machine's quietness: when other processes compete
for the cores, torch's threads oversubscribe and a prefill can take several times longer. Every
timed call is wrapped in :func:`measure`, which records beside the wall-clock:

- ``load1``: the 1-minute load average when the call started (``os.getloadavg``);
- ``cpu_seconds``: the process's CPU time over the call (all threads);
- ``cpu_per_wall``: ``cpu_seconds / wall``. On a quiet machine a call that keeps ``t`` torch threads
  busy approaches ``t``; competing processes take cores away and the ratio falls.

:func:`contention` turns those rows into a verdict: a round is *contended* when its CPU/wall ratio
is below ``0.6 x`` the median of the same strategy's rounds (something took cores away during that
round), and a call is *busy at start* when the 1-minute load average exceeded the core count by more
than ``0.5``. The load includes the benchmark's own threads (about one per core on a quiet machine),
so a whole run slowed evenly by a competing process, which the relative test cannot see, shows up
here. Both thresholds are choices.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after a reset; on Linux CPUs the process's
peak resident set (``VmHWM``), reset before the call by writing ``5`` to ``/proc/self/clear_refs``;
freed heap is first returned to the system (``malloc_trim``), so the peak above the resident set
before the call is what the call itself allocated. Elsewhere the peak is reported as unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

__all__ = ["Sample", "measure", "contention", "busy_note", "peak_memory", "PeakMemory", "cpu_count"]

CONTENDED_FRACTION = 0.6
BUSY_LOAD_MARGIN = 0.5


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _load1() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


@dataclass
class Sample:
    """Wall-clock, CPU time and load of one measured call (filled when the ``with`` block ends)."""

    load1: float | None = None
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def cpu_per_wall(self) -> float:
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def row(self) -> dict:
        return {"load1": self.load1, "cpu_seconds": self.cpu_seconds, "cpu_per_wall": self.cpu_per_wall}


@contextlib.contextmanager
def measure(device: torch.device | str = "cpu") -> Iterator[Sample]:
    """Measure the block: ``with measure() as s: ...`` then ``s.wall_seconds``, ``s.cpu_per_wall``."""
    sample = Sample(load1=_load1())
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        yield sample
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        sample.wall_seconds = time.perf_counter() - wall0
        sample.cpu_seconds = time.process_time() - cpu0


def contention(runs: pd.DataFrame, *, by: str | list[str] = "strategy", cores: int | None = None) -> pd.DataFrame:
    """Add ``contended`` (per row) to timing rows with ``cpu_per_wall`` and ``load1`` columns.

    A row is contended when its CPU/wall ratio is below ``CONTENDED_FRACTION`` of the median of the
    rows with the same ``by`` value (the same work, so the same ratio on a quiet machine).
    """
    out = runs.copy()
    median = out.groupby(by)["cpu_per_wall"].transform("median")
    out["contended"] = out["cpu_per_wall"] < CONTENDED_FRACTION * median
    out["busy_at_start"] = out["load1"] > (cores or cpu_count()) + BUSY_LOAD_MARGIN
    return out


def busy_note(runs: pd.DataFrame, cores: int | None = None) -> str:
    """One sentence for a table's notes: quiet, or how many rounds look contended and the load seen."""
    flagged = contention(runs, cores=cores) if "contended" not in runs else runs
    n, bad = len(flagged), int(flagged["contended"].sum())
    loads = flagged["load1"].dropna()
    load_text = (f"1-min load {loads.min():.2f}-{loads.max():.2f} on {cores or cpu_count()} cores"
                 if len(loads) else "load average not available")
    busy = bool(flagged["busy_at_start"].any())
    if not bad and not busy:
        return f"machine quiet: no contended round of {n}; {load_text}."
    return (f"WARNING: busy machine: {bad} of {n} timed calls contended (CPU/wall under "
            f"{CONTENDED_FRACTION:.0%} of their strategy's median){'; load above the core count' if busy else ''}; "
            f"{load_text}. Ratios from the same round are still comparable; absolute times are not.")


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of one call: bytes above what was resident (CPU) or allocated (CUDA) before it."""

    peak_bytes: int | None  # None: not measurable here
    baseline_bytes: int | None
    kind: str  # "cuda_allocated", "cpu_rss" or "unavailable"


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[list[PeakMemory]]:
    """``with peak_memory() as out: ...`` then ``out[0]``: the block's peak memory above its start."""
    holder: list[PeakMemory] = []
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            yield holder
        finally:
            torch.cuda.synchronize(device)
            holder.append(PeakMemory(torch.cuda.max_memory_allocated(device) - base, base, "cuda_allocated"))
        return
    ok = _reset_cpu_peak()
    base = _status_kib("VmRSS")
    try:
        yield holder
    finally:
        peak = _status_kib("VmHWM")
        if ok and base is not None and peak is not None:
            holder.append(PeakMemory(max(0, peak - base) * 1024, base * 1024, "cpu_rss"))
        else:
            holder.append(PeakMemory(None, None, "unavailable"))


def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None
