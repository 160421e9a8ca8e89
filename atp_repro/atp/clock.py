"""Time spent in ATP's own code regions, on the device's timeline.

On CPU a region's time is wall-clock (``perf_counter``). On CUDA the host returns from kernel
launches long before they finish, and a host clock would record launch costs (or, across a sync,
the preceding layer's work), so each region is bracketed by CUDA events and their GPU-side
elapsed times are summed once, at :meth:`OverheadClock.seconds`.

Every region is also a ``torch.profiler.record_function`` range, so that a profile of a prefill
shows ATP's own ops under ``atp::<name>``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class OverheadClock:
    """Sums the durations of (non-nested) code regions run on one device."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._host_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def region(self, name: str = "overhead") -> Iterator[None]:
        with torch.profiler.record_function(f"atp::{name}"), self._timed():
            yield

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            start_time = time.perf_counter()
            try:
                yield
            finally:
                self._host_seconds += time.perf_counter() - start_time

    def seconds(self) -> float:
        """Total time of all regions so far (waits for the last CUDA region to finish)."""
        if not self._events:
            return self._host_seconds
        self._events[-1][1].synchronize()
        return self._host_seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1e3
