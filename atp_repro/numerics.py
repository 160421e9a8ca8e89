"""Bit-reproducible CPU numerics: the same commit gives the same bits on any Intel x86-64 CPU with AVX2.

Floating-point results of a CPU kernel depend on the code path the library picks at run time for
the machine it finds: ATen's vectorised kernels (AVX2 or AVX512), oneDNN's convolutions and MKL's
BLAS each choose their instruction set, and a wider vector sums in another order. A from-scratch
training amplifies the last-bit differences until verdicts flip. The ``pinned`` mode (the default
of ``atp-repro`` and ``make reproduce``) caps every one of those libraries at AVX2, which every
x86-64 CPU of the last decade has, and fixes the thread count; ``native`` (``ATP_REPRO_NUMERICS=native``,
or ``make reproduce FAST=1``) lets each library use the widest path it finds.

One library does not always obey: Intel's MKL honours ``MKL_CBWR=AVX2`` on Intel CPUs only. On other
CPUs (AMD's) it runs its ``AUTO`` branch instead (Intel's "Getting Started with Conditional
Numerical Reproducibility"), so the same commit gives other bits there. :func:`mkl_branch` reads
the branch MKL really uses; a process whose branch is not AVX2 is not pinned (``in_effect`` false),
records the branch in its provenance, and keys its artifacts apart (:func:`cache_key`).
``MKL_CBWR=COMPATIBLE`` would give the same bits on every vendor, at the price of SSE2 matmuls.

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
PINNED_MKL_BRANCH = "AVX2"  # the MKL code branch MKL_CBWR asks for

# MKL's code-branch constants (mkl_cbwr.h), as mkl_cbwr_get(MKL_CBWR_BRANCH) returns them.
MKL_BRANCHES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1",
                14: "AVX512_E1"}
_MKL_CBWR_BRANCH, _MKL_CBWR_STRICT = 1, 0x10000


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


def mkl_branch() -> dict[str, Any] | None:
    """The code branch MKL (linked into torch) really uses in this process: ``{"branch", "strict",
    "auto"}`` (names from :data:`MKL_BRANCHES`; ``auto`` is what ``AUTO`` would pick on this CPU), or
    ``None`` when torch carries no MKL whose branch can be read (e.g. an ARM build)."""
    import ctypes

    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get, get_auto = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_get_auto_branch
    except (OSError, AttributeError):
        return None
    get.restype = get_auto.restype = ctypes.c_int
    everything = get(-1)  # MKL_CBWR_ALL: the branch and the STRICT flag
    branch = get(_MKL_CBWR_BRANCH)
    return {"branch": MKL_BRANCHES.get(branch, str(branch)), "strict": bool(everything & _MKL_CBWR_STRICT),
            "auto": MKL_BRANCHES.get(get_auto(), str(get_auto()))}


def state() -> dict[str, Any]:
    """What is in effect in this process: the mode, the pinned variables, torch's capability and
    MKL's branch.

    ``in_effect`` is true when the process asked for the pinned mode and torch really runs the
    AVX2 path with the pinned environment, and MKL (where its branch can be read) the AVX2 branch.
    """
    mode = os.environ.get(MODE_ENV_VAR, "native")
    out: dict[str, Any] = {"mode": mode, "env": {k: os.environ.get(k) for k in PINNED_ENV}}
    try:
        import torch
    except ImportError:  # configuration tools run without torch
        return out
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["torch_threads"] = torch.get_num_threads()
    mkl = mkl_branch()
    if mkl is not None:
        out["mkl"] = mkl
    out["in_effect"] = (
        mode == "pinned" and out["cpu_capability"] == PINNED_CAPABILITY
        and all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
        and (mkl is None or mkl["branch"] == PINNED_MKL_BRANCH)
    )
    return out


def mkl_not_honoured(s: dict[str, Any] | None = None) -> str | None:
    """A sentence saying that the pinned mode could not pin MKL in this process, or ``None``."""
    s = state() if s is None else s
    mkl = s.get("mkl")
    if s.get("mode") != "pinned" or mkl is None or mkl["branch"] == PINNED_MKL_BRANCH:
        return None
    return (f"MKL runs its {mkl['branch']} branch, not the {PINNED_MKL_BRANCH} branch MKL_CBWR asks for (MKL "
            f"honours it on Intel CPUs only): results here match tables made on Intel CPUs statistically, "
            f"not to the bit")


def cache_key() -> str:
    """The part of a trained artifact's cache key that the numerics decide.

    Pinned runs share one key on every machine where the pin holds; a pinned run whose MKL ignored
    the pin is keyed by MKL's branch, and native runs by the capability torch found, so that an
    artifact trained on another code path is never mistaken for this one's.
    """
    s = state()
    if s.get("in_effect"):
        return "pinned-avx2"
    if mkl_not_honoured(s) and s.get("cpu_capability") == PINNED_CAPABILITY:
        return f"pinned-avx2-mkl-{s['mkl']['branch'].lower()}"
    return f"native-{s.get('cpu_capability', 'unknown').lower()}"
