"""Prefill timing: image encoding + transformer forward, never loading (supplementary Sec. 2.1).

One *prefill* is ``model(input_ids, attention_mask, pixel_values, use_cache=True,
logits_to_keep=1)`` under ``torch.inference_mode()``: what ``generate`` runs before its first new
token. The clock starts after the inputs are on the device and stops when the logits of the last
position exist; on CUDA both ends are synchronised. Forward hooks on the vision tower and the
projector time the image encoding inside the same call.

:func:`environment_facts` records what every result row carries: device, dtype, threads, torch
version. :func:`layer_backends` names the attention kernel each decoder layer really ran.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PrefillTiming",
    "synchronize",
    "time_prefill",
    "run_prefill",
    "summarize",
    "environment_facts",
    "layer_backends",
    "compact_backends",
]


@dataclass(frozen=True)
class PrefillTiming:
    """One timed prefill."""

    seconds: float  # whole prefill
    encode_seconds: float  # vision tower + projector
    overhead_seconds: float | None  # ATP modules' own time (scoring, thresholds, gathering); None without ATP


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_prefill(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """One prefill; returns the model output (its cache holds the per-layer keys and values)."""
    with torch.inference_mode():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def time_prefill(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> PrefillTiming:
    """Time one prefill (see the module docstring)."""
    device = inputs["input_ids"].device
    marks: dict[str, float] = {}

    def mark(name: str):
        def hook(*_args, **_kwargs):
            synchronize(device)
            marks[name] = time.perf_counter()
        return hook

    inner = model.model
    handles = [inner.vision_tower.register_forward_pre_hook(mark("encode_start")),
               inner.multi_modal_projector.register_forward_hook(mark("encode_end"))]
    try:
        synchronize(device)
        start = time.perf_counter()
        output = run_prefill(model, inputs)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    del output
    overhead = None
    runtime = getattr(inner.language_model, "_atp_runtime", None)
    if runtime is not None and runtime.record is not None:
        overhead = runtime.record.overhead_seconds
    encode = marks.get("encode_end", start) - marks.get("encode_start", start)
    return PrefillTiming(seconds, encode, overhead)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated values: ``median, min, max, q1, q3, iqr, spread`` (max-min over median).

    Quartiles use the inclusive method (the sample's own min and max are the 0th and 4th quartile).
    """
    if not values:
        raise ValueError("no timings to summarize")
    ordered = sorted(values)
    median = statistics.median(ordered)
    q1, q3 = (statistics.quantiles(ordered, n=4, method="inclusive")[i] for i in (0, 2)) if len(ordered) > 1 else (
        median, median)
    return {"median": median, "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3, "iqr": q3 - q1,
            "spread": (ordered[-1] - ordered[0]) / median if median else 0.0}


def environment_facts(device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Device, dtype, threads and versions, recorded in every timing row."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": device.type, "device_name": name, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cpu_name() -> str:
    from atp_repro.provenance import device_info

    return str(device_info().get("processor", "cpu"))


def layer_backends(
    num_layers: int, implementation: str, module_layers: Sequence[int] = (), scoring: str | None = None
) -> list[str]:
    """The attention kernel of each decoder layer.

    Without ATP (``scoring=None``) every layer runs ``implementation``. With ATP, pruning layers
    run ``eager`` and reduce its probability map when scoring is ``eager`` (the paper's strategy)
    or when the model itself is eager; with ``fast`` they keep ``implementation`` and compute the
    scores from the layer's queries and keys (``<impl>+qk-scores``).
    """
    backends = [implementation] * num_layers
    if scoring is None:
        return backends
    if scoring not in ("eager", "fast"):
        raise ValueError(f"scoring={scoring!r} is not one of ('eager', 'fast', None)")
    for layer in module_layers:
        eager = scoring == "eager" or implementation == "eager"
        backends[layer] = "eager+map-scores" if eager else f"{implementation}+qk-scores"
    return backends


def compact_backends(backends: Sequence[str]) -> str:
    """Run-length text of per-layer backends: ``0-3:sdpa 4:eager+map-scores 5-13:sdpa ...``."""
    parts, start = [], 0
    for i in range(1, len(backends) + 1):
        if i == len(backends) or backends[i] != backends[start]:
            span = str(start) if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span}:{backends[start]}")
            start = i
    return " ".join(parts)
