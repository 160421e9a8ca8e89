"""Supplementary Table 3's strategies, plus ours, timed in one run on one set of weights.

=============  =====================================  ==========================================
strategy       paper row (supplementary Table 3)      attention kernels
=============  =====================================  ==========================================
``ub_eager``   U.B. w/o flash attn                    eager everywhere (no fast kernel)
``ub_fast``    U.B. w/ flash attn                     fast kernel everywhere
``atp_eager``  ATP w/o flash attn                     eager everywhere; scores from the eager map
``atp_paper``  ATP w/ flash attn                      eager at the 3 pruning layers (map scores),
                                                      fast kernel elsewhere (strategy (2))
``atp_fast``   (ours, not in the paper)               fast kernel everywhere; scores from q/k
=============  =====================================  ==========================================

``baselines`` adds training-free methods (:mod:`atp_repro.baselines`) at the same average token
count, each as a strategy ``baseline_<method>``: those that prune inside the language model (FastV,
PyramidDrop, SparseVLM and the controls) with the fast kernel everywhere and scores from q/k at their
own pruning layers; VisionZip and PruMerge+ shorten the prompt before the language model (their
selection and merging run inside the timed prefill, after the vision tower).

"Fast kernel" is ``flash_attention_2`` on a GPU with flash-attn installed, else ``sdpa`` (on CPU
the stand-ins for "no flash" / "flash" are eager / SDPA). All strategies share the same weights:
the ATP models are copies of the upper-bound model whose parameters are the same tensors. Runs
are interleaved round-robin (the order rotates every round) so that load changes on a shared
machine hit every strategy alike; medians are reported.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import statistics
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from atp_repro.atp import ATPConfig, apply_atp
from atp_repro.baselines import baseline_token_counts

from .flops import ModelShapes, prefill_flops
from .kv_cache import analytic_kv_bytes, cache_of, measure_kv_cache
from .machine import busy_note, contention, measure, peak_memory
from .models import (
    TimingModelConfig,
    build_timing_model,
    layer_vision_counts,
    solve_fixed_keep,
    timing_inputs,
    timing_model_config,
)
from .timing import compact_backends, environment_facts, layer_backends, run_prefill, summarize, time_prefill

__all__ = ["Strategy", "STRATEGIES", "BenchConfig", "BenchConfigError", "BenchResult", "run_benchmark",
           "resolve_fast_backend", "resolve_dtype", "fast_bf16_available"]


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str  # row label (the paper's, where it has one)
    atp: bool
    fast_attention: bool  # model-wide kernel: fast (SDPA / flash) or eager
    scoring: str | None  # ATP scoring backend: "eager" (map) or "fast" (q/k blocks)
    in_paper: bool = True


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("ub_eager", "U.B. w/o flash attn", atp=False, fast_attention=False, scoring=None),
    Strategy("ub_fast", "U.B. w/ flash attn", atp=False, fast_attention=True, scoring=None),
    Strategy("atp_eager", "ATP w/o flash attn", atp=True, fast_attention=False, scoring="eager"),
    Strategy("atp_paper", "ATP w/ flash attn", atp=True, fast_attention=True, scoring="eager"),
    Strategy("atp_fast", "ATP w/ fast kernel everywhere (ours)", atp=True, fast_attention=True, scoring="fast",
             in_paper=False),
)}
FAST_BACKENDS = ("auto", "sdpa", "flash_attention_2")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def fast_bf16_available(device: str = "cpu") -> bool:
    """Whether bf16 matmuls have a fast kernel here (CUDA, or a CPU with oneDNN bf16 support).

    Without it (e.g. an AVX2-only CPU), bf16 matmuls fall back to a reference path that is ~10x
    slower than fp32, and timing in bf16 would measure that fallback rather than the model.
    """
    if device == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(choice: str, device: str) -> str:
    """``auto``: bfloat16 where it is fast (the paper's precision), else float32."""
    if choice == "auto":
        return "bfloat16" if fast_bf16_available(device) else "float32"
    return choice


class BenchConfigError(ValueError):
    """A benchmark setting is invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _fail(name: str, value: Any, allowed: str) -> None:
    raise BenchConfigError(name, f"BenchConfig.{name}={value!r} is invalid: expected {allowed}.")


class RunSettings:
    """What a timing config shares (``fast_backend``, ``dtype``, ``device``, ``warmup``, ``repeats``,
    ``threads``): their checks and resolved values. ``fail(name, value, allowed)`` raises the config's error."""

    def check_run_settings(self, fail) -> None:
        if self.fast_backend not in FAST_BACKENDS:
            fail("fast_backend", self.fast_backend, f"one of {FAST_BACKENDS}")
        if self.dtype not in ("auto", *DTYPES):
            fail("dtype", self.dtype, f"one of {('auto', *DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            fail("device", self.device, "one of ('auto', 'cpu', 'cuda')")
        if self.device == "cuda" and not torch.cuda.is_available():
            fail("device", self.device, "'auto' or 'cpu' (CUDA is not available here)")
        if not _is_int(self.warmup, 0):
            fail("warmup", self.warmup, "an int >= 0")
        if not _is_int(self.repeats, 1):
            fail("repeats", self.repeats, "an int >= 1")
        if self.threads is not None and not _is_int(self.threads, 1):
            fail("threads", self.threads, "None or an int >= 1")

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[resolve_dtype(self.dtype, self.resolved_device)]


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class BenchConfig(RunSettings):
    """What to time.

    Attributes:
        model: shapes of the timing model (``module_layers`` are the ATP positions).
        average_tokens: target average vision tokens over all layers; solved into ``fixed_keep``
            by :func:`~atp_repro.efficiency.models.solve_fixed_keep` unless ``fixed_keep`` is given.
        fixed_keep: explicit kept counts, one per ATP module (non-negative, non-increasing).
        strategies: names from :data:`STRATEGIES`, timed in this order (rotated per round).
        fast_backend: ``auto`` (flash_attention_2 on CUDA if installed, else sdpa), ``sdpa`` or
            ``flash_attention_2``.
        dtype: ``auto`` (bfloat16 where bf16 matmuls are fast, else float32: see
            :func:`fast_bf16_available`), ``bfloat16`` or ``float32``.
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
        warmup: untimed rounds first; repeats: timed rounds.
        threads: torch intra-op threads (None: leave torch's default).
    """

    model: TimingModelConfig = field(default_factory=TimingModelConfig)
    average_tokens: float | None = 144.0
    fixed_keep: tuple[int, ...] | None = None
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    fast_backend: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    warmup: int = 2
    repeats: int = 7
    threads: int | None = None
    baselines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", timing_model_config(self.model))
        for name in ("fixed_keep", "strategies", "baselines"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.model, TimingModelConfig):
            _fail("model", self.model, "a TimingModelConfig or a preset name")
        modules = self.model.module_layers
        if self.fixed_keep is not None:
            keep = self.fixed_keep
            if len(keep) != len(modules):
                _fail("fixed_keep", keep, f"one count per ATP module: {len(modules)} values for "
                      f"module_layers={modules}")
            if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in keep):
                _fail("fixed_keep", keep, "non-negative ints")
            if any(k > self.model.num_vision for k in keep) or any(b > a for a, b in zip(keep, keep[1:])):
                _fail("fixed_keep", keep, f"non-increasing counts <= {self.model.num_vision} vision tokens")
        elif self.average_tokens is not None:
            try:
                solve_fixed_keep(self.average_tokens, module_layers=modules, num_layers=self.model.num_layers,
                                 num_vision=self.model.num_vision)
            except ValueError as err:
                raise BenchConfigError("average_tokens", str(err)) from None
        elif any(STRATEGIES[s].atp for s in self.strategies if s in STRATEGIES):
            _fail("average_tokens", None, "a target average (or fixed_keep) when ATP strategies are timed")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or unknown or len(set(self.strategies)) != len(self.strategies):
            _fail("strategies", self.strategies, f"distinct names from {list(STRATEGIES)}")
        self.check_run_settings(_fail)
        if self.baselines:
            from atp_repro.baselines import METHODS, VISION_SIDE_METHODS, stage_counts

            bad = [b for b in self.baselines if b not in METHODS]
            if bad or len(set(self.baselines)) != len(self.baselines):
                _fail("baselines", self.baselines, f"distinct names from {list(METHODS)}")
            if self.average_tokens is None:
                _fail("average_tokens", None, "a target average when baselines are timed")
            for b in self.baselines:
                if b in VISION_SIDE_METHODS:
                    if self.model.tiles > 1:
                        _fail("baselines", self.baselines, f"in-LLM methods only with tiles={self.model.tiles}: {b} "
                              "reduces each image before the language model and is timed on single-tile inputs")
                    if not 2 <= self.average_tokens <= self.model.num_vision:
                        _fail("average_tokens", self.average_tokens, f"{b}: a budget in [2, {self.model.num_vision}] "
                              "vision tokens")
                    continue
                try:
                    stage_counts(b, self.average_tokens, self.model.num_layers, self.model.num_vision)
                except ValueError as err:
                    raise BenchConfigError("average_tokens", f"{b}: {err}") from None
        if self.fast_backend == "flash_attention_2" and not _flash_attention_usable(self.resolved_device):
            _fail("fast_backend", self.fast_backend, "'auto' or 'sdpa' (flash_attention_2 needs CUDA and the "
                  "flash-attn package)")

    @property
    def resolved_fixed_keep(self) -> tuple[int, ...] | None:
        if self.fixed_keep is not None:
            return self.fixed_keep
        if self.average_tokens is None:
            return None
        m = self.model
        return solve_fixed_keep(self.average_tokens, module_layers=m.module_layers, num_layers=m.num_layers,
                                num_vision=m.num_vision)

    def replace(self, **changes: Any) -> BenchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["resolved_fixed_keep"] = self.resolved_fixed_keep
        return out


def _flash_attention_usable(device: str) -> bool:
    return device == "cuda" and importlib.util.find_spec("flash_attn") is not None


def resolve_fast_backend(choice: str, device: str) -> str:
    """The fast attention kernel actually used: flash_attention_2 where possible under ``auto``."""
    if choice == "auto":
        return "flash_attention_2" if _flash_attention_usable(device) else "sdpa"
    return choice


@dataclass
class BenchResult:
    """Everything one benchmark run measured.

    ``runs``: tidy rows, one per timed prefill; ``summary``: one row per strategy (medians,
    spread, tokens, FLOPs, KV bytes, backends); ``facts``: environment and schedule.
    """

    config: BenchConfig
    runs: pd.DataFrame
    summary: pd.DataFrame
    facts: dict[str, Any]


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters are the *same* tensors (no extra weight memory)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _baseline_plans(config: BenchConfig, base_model: torch.nn.Module, fast_impl: str,
                    inputs: dict[str, torch.Tensor]) -> list[dict]:
    """One plan per baseline: a shared-weight copy pruned by the method at the config's average.

    In-LLM methods prune at their own decoder layers (scores from q/k, fast kernel everywhere);
    vision-side methods (VisionZip, PruMerge+) shorten the prompt before the language model, so
    every layer sees their count (PruMerge+'s stride is set on the timed image itself).
    """
    from atp_repro.baselines import VISION_SIDE_METHODS, apply_baseline, module_layers_of, stage_counts

    cfg, plans = config.model, []
    for method in config.baselines:
        if method in VISION_SIDE_METHODS:
            model = apply_baseline(_shared_copy(base_model), method, config.average_tokens,
                                   calibration=inputs["pixel_values"]).eval()
            run_prefill(model, inputs)
            count = int(baseline_token_counts(model)[0, 0])
            strategy = Strategy(f"baseline_{method}", f"{method} (training-free, before the LLM)", atp=False,
                                fast_attention=True, scoring=None, in_paper=False)
            plans.append({"strategy": strategy, "model": model, "impl": fast_impl, "keep": (count,),
                          "counts": [count] * cfg.num_layers, "reduced": True,
                          "backends": compact_backends([fast_impl] * cfg.num_layers)})
            continue
        starts, counts = stage_counts(method, config.average_tokens, cfg.num_layers, cfg.num_vision)
        modules = module_layers_of(starts)
        model = apply_baseline(_shared_copy(base_model), method, config.average_tokens,
                               scoring_backend="fast").eval()
        strategy = Strategy(f"baseline_{method}", f"{method} (training-free, fast kernel)", atp=True,
                            fast_attention=True, scoring="fast", in_paper=False)
        plans.append({"strategy": strategy, "model": model, "impl": fast_impl, "keep": counts,
                      "counts": layer_vision_counts(counts, modules, cfg.num_layers, cfg.num_vision),
                      "backends": compact_backends(layer_backends(cfg.num_layers, fast_impl, modules, "fast"))})
    return plans


def run_benchmark(config: BenchConfig, *, base_model: torch.nn.Module | None = None, run_id: str = "",
                  progress: bool = False) -> BenchResult:
    """Time every strategy of ``config`` in one interleaved run.

    Args:
        config: what to time.
        base_model: a stock model built by :func:`build_timing_model` for ``config.model`` (to reuse
            weights across runs); built here when None. It is not modified.
        run_id: stored in every row.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device, dtype, cfg = config.resolved_device, config.torch_dtype, config.model
    fast_impl = resolve_fast_backend(config.fast_backend, device)
    if base_model is None:
        base_model = build_timing_model(cfg, dtype=dtype, device=device, attn_implementation=fast_impl)
    inputs = timing_inputs(cfg, dtype=dtype, device=device)
    keep = config.resolved_fixed_keep
    models: dict[str | None, torch.nn.Module] = {None: base_model}
    baseline_plans = _baseline_plans(config, base_model, fast_impl, inputs)
    for strategy in (STRATEGIES[s] for s in config.strategies):
        if strategy.atp and strategy.scoring not in models:
            atp_cfg = ATPConfig(module_layers=cfg.module_layers, fixed_keep=keep, scoring_backend=strategy.scoring)
            models[strategy.scoring] = apply_atp(_shared_copy(base_model), atp_cfg).eval()

    shapes = ModelShapes.from_config(base_model)
    facts = environment_facts(device, dtype)
    plans = []
    for name in config.strategies:
        s = STRATEGIES[name]
        impl = fast_impl if s.fast_attention else "eager"
        counts = layer_vision_counts(keep if s.atp else None, cfg.module_layers, cfg.num_layers, cfg.num_vision)
        backends = layer_backends(cfg.num_layers, impl, cfg.module_layers if s.atp else (), s.scoring)
        plans.append({"strategy": s, "model": models[s.scoring if s.atp else None], "impl": impl,
                      "counts": counts, "backends": compact_backends(backends), "keep": keep if s.atp else None})
    plans += baseline_plans

    # Check pass: the schedule and the cache really are what the analytic numbers assume.
    checks = {}
    for plan in plans:
        plan["model"].set_attn_implementation(plan["impl"])
        run_prefill(plan["model"], inputs)  # one-time costs (kernel scratch, thread stacks) before the peak
        with peak_memory(device) as peak:
            output = run_prefill(plan["model"], inputs)
        measured = measure_kv_cache(cache_of(output), cfg.prefix_tokens, cfg.prompt_tokens)
        del output
        if plan["strategy"].atp or plan.get("reduced"):
            avg = float(baseline_token_counts(plan["model"]).float().mean())
        else:
            avg = float(cfg.num_vision)
        checks[plan["strategy"].name] = {"measured_avg_tokens": avg, "kv": measured, "peak": peak[0]}

    for _ in range(config.warmup):
        for plan in plans:
            plan["model"].set_attn_implementation(plan["impl"])
            time_prefill(plan["model"], inputs)

    rows = []
    for r in range(config.repeats):
        order = plans[r % len(plans):] + plans[: r % len(plans)]
        for plan in order:
            plan["model"].set_attn_implementation(plan["impl"])
            with measure(device) as machine:
                t = time_prefill(plan["model"], inputs)
            s = plan["strategy"]
            rows.append({
                "run_id": run_id, "strategy": s.name, "label": s.label, "round": r, "seconds": t.seconds,
                "encode_seconds": t.encode_seconds, "overhead_seconds": t.overhead_seconds,
                "attn_implementation": plan["impl"], "scoring_backend": s.scoring or "",
                "layer_backends": plan["backends"], "vision_backend": plan["impl"], "model": cfg.name,
                "fixed_keep": str(tuple(plan["keep"])) if plan["keep"] is not None else "", **machine.row(), **facts,
            })
            if progress:
                print(f"round {r} {s.name}: {t.seconds * 1e3:.1f} ms", flush=True)
    runs = contention(pd.DataFrame(rows), by="strategy")
    summary = _summarize(runs, plans, checks, shapes, cfg, dtype)
    facts = {**facts, "fast_backend": fast_impl, "fast_bf16": fast_bf16_available(device), "fixed_keep": keep,
             "module_layers": cfg.module_layers, "model_config": cfg.to_dict(), "rounds": config.repeats,
             "warmup": config.warmup, "machine": busy_note(runs)}
    return BenchResult(config, runs, summary, facts)


def _summarize(runs: pd.DataFrame, plans: list[dict], checks: dict, shapes: ModelShapes, cfg: TimingModelConfig,
               dtype: torch.dtype) -> pd.DataFrame:
    records = []
    for plan in plans:
        s = plan["strategy"]
        mine = runs[runs.strategy == s.name]
        stats = summarize(mine.seconds.tolist())
        flops = prefill_flops(shapes, cfg.text_tokens, plan["counts"])
        kv = checks[s.name]["kv"]
        overhead_fraction = None
        if s.atp:
            overhead_fraction = statistics.median((mine.overhead_seconds / mine.seconds).tolist())
        records.append({
            "strategy": s.name, "label": s.label, "in_paper": s.in_paper,
            "avg_tokens": sum(plan["counts"]) / len(plan["counts"]),  # vision tokens averaged over layers
            "measured_avg_tokens": checks[s.name]["measured_avg_tokens"],
            "median_s": stats["median"], "min_s": stats["min"], "max_s": stats["max"], "iqr_s": stats["iqr"],
            "spread": stats["spread"], "encode_median_s": float(mine.encode_seconds.median()),
            "overhead_median_s": float(mine.overhead_seconds.median()) if s.atp else None,
            "overhead_fraction": overhead_fraction,
            "flops": flops.total, "lm_flops": flops.language_model,
            "kv_vision_bytes_measured": kv.vision_bytes,
            "kv_vision_bytes_analytic": analytic_kv_bytes(shapes, plan["counts"], dtype=dtype),
            "kv_dtype": kv.dtype, "peak_prefill_bytes": checks[s.name]["peak"].peak_bytes,
            "memory_kind": checks[s.name]["peak"].kind, "attn_implementation": plan["impl"],
            "scoring_backend": s.scoring or "",
            "layer_backends": plan["backends"],
        })
    return pd.DataFrame(records)
