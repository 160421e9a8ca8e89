"""Bit-reproducible CPU numerics: the same commit gives the same bits on any x86-64 CPU with AVX2.

Floating-point results of a CPU kernel depend on the code path the library picks at run time for
the machine it finds: ATen's vectorised kernels (AVX2 or AVX512), oneDNN's convolutions and MKL's
BLAS each choose their instruction set, and a wider vector sums in another order. A from-scratch
training amplifies the last-bit differences until verdicts flip. The ``pinned`` mode (the default
of ``atp-repro`` and ``make reproduce``) caps every one of those libraries at AVX2, which every
x86-64 CPU of the last decade has, and fixes the thread count; ``native`` (``ATP_REPRO_NUMERICS=native``,
or ``make reproduce FAST=1``) lets each library use the widest path it finds.

The settings are environment variables read when torch loads, so they must be in place before the
first ``import torch`` of a process. :func:`apply` puts them in ``os.environ`` (the ``atp-repro``
command calls it first thing); notebook kernels and training subprocesses inherit them.
:func:`state` reads back what is really in effect, for provenance and cache keys.

This module must not import torch at import time.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

MODE_ENV_VAR = "ATP_REPRO_NUMERICS"
MODES = ("pinned", "native")
DEFAULT_MODE = "pinned"

# Environment of the pinned mode. ATen: vectorised kernels (softmax, GELU, reductions, ...);
# oneDNN: convolutions (the vision tower's patch embedding); MKL: BLAS (matmuls) in strict
# conditional-numerical-reproducibility mode; OpenMP/MKL threads: two, the mini world's count.
PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_DYNAMIC": "FALSE",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}
PINNED_CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() reports when pinned


def requested_mode() -> str:
    """The mode asked for by ``ATP_REPRO_NUMERICS`` (default ``pinned``); a bad value is an error."""
    mode = os.environ.get(MODE_ENV_VAR, DEFAULT_MODE).strip().lower() or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV_VAR}={mode!r} is invalid: expected one of {MODES}")
    return mode


def apply(mode: str | None = None) -> str:
    """Put the mode's settings in ``os.environ`` (inherited by kernels and subprocesses).

    Must run before torch is imported in this process to affect the process itself; if torch is
    already loaded with another capability, a warning says so (child processes are still pinned).
    Returns the mode applied.
    """
    mode = requested_mode() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"numerics mode {mode!r} is invalid: expected one of {MODES}")
    os.environ[MODE_ENV_VAR] = mode
    if mode == "pinned":
        os.environ.update(PINNED_ENV)
        if "torch" in sys.modules:
            capability = sys.modules["torch"].backends.cpu.get_cpu_capability()
            if capability != PINNED_CAPABILITY:
                warnings.warn(
                    f"torch was imported before the pinned numerics were applied (CPU capability "
                    f"{capability}); this process is not pinned, its child processes are",
                    stacklevel=2,
                )
    return mode


def state() -> dict[str, Any]:
    """What is in effect in this process: the mode, the pinned variables and torch's capability.

    ``in_effect`` is true when the process asked for the pinned mode and torch really runs the
    AVX2 path with the pinned environment.
    """
    mode = os.environ.get(MODE_ENV_VAR, "native")
    out: dict[str, Any] = {"mode": mode, "env": {k: os.environ.get(k) for k in PINNED_ENV}}
    try:
        import torch
    except ImportError:  # configuration tools run without torch
        return out
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["torch_threads"] = torch.get_num_threads()
    out["in_effect"] = (
        mode == "pinned" and out["cpu_capability"] == PINNED_CAPABILITY
        and all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
    )
    return out


def cache_key() -> str:
    """The part of a trained artifact's cache key that the numerics decide.

    Pinned runs share one key on every AVX2 machine; native runs are keyed by the capability torch
    found, so that an artifact trained on another code path is never mistaken for this one's.
    """
    s = state()
    if s.get("in_effect"):
        return "pinned-avx2"
    return f"native-{s.get('cpu_capability', 'unknown').lower()}"
