"""End-to-end generation with the KV cache: time to first token, decode speed, KV bytes, peak memory.

Table 3 times prefill only. In generation the pruned cache matters a second time: every new token
attends to what the cache holds, so ATP's shorter cache should make each decode step cheaper. This
benchmark runs ``model.generate`` (greedy, exactly ``new_tokens`` new tokens, KV cache) for:

===============  ===========================================================================
strategy         what runs
===============  ===========================================================================
``upper_bound``  the stock model (fast attention kernel)
``atp``          ATP (fast kernel everywhere, scores from q/k); at batch 1 the fixed schedule of
                 Table 3 (exact average), at batch > 1 thresholds calibrated on the batch to the
                 same average, so that every sample keeps its *own* count (instance adaptivity)
``text_only``    the stock model on the same prompts without their image: the decode floor
===============  ===========================================================================

Samples of a batch have prompts of different lengths (left padding), and under ATP different kept
counts; the cache then holds, per layer, the longest sample's positions (shorter ones padded).

Clock: a logits processor stamps the time when each step's logits exist (synchronised on CUDA).
Time to first token (TTFT) = prefill + first token; decode = the remaining ``new_tokens - 1`` steps;
decode tokens/s counts every sample's tokens.

Prediction of ATP's decode saving (stated model): a decode step costs ``t0 + beta * S`` where S is
the number of cached positions summed over layers (what the step reads from the cache and attends
to; proportional to the KV bytes). The upper bound and the text-only run, timed in the same round,
give two points of that line, so

    predicted saving = (t_ub - t_text) / t_ub * (S_ub - S_atp) / (S_ub - S_text)

with each S read from the real caches. The measured saving is ``1 - t_atp / t_ub`` of the same
round; both are reported as medians and quartiles over interleaved rounds. A FLOPs-only prediction
(decode-step FLOPs with each layer's cache length) is reported beside it: on hardware where
decoding is bound by reading weights and the cache rather than by arithmetic it says little.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from atp_repro.atp import ATPConfig, apply_atp, token_counts
from atp_repro.atp.calibration import calibrate_thresholds

from .flops import ModelShapes, decoder_layer_flops
from .kv_cache import cache_of
from .machine import busy_note, contention, measure, peak_memory
from .models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TimingModelConfig,
    build_timing_model,
    solve_fixed_keep,
    timing_inputs,
    timing_model_config,
)
from .strategies import BenchConfigError, RunSettings, _is_int, _shared_copy, resolve_fast_backend
from .timing import environment_facts, summarize

__all__ = ["GenerationConfig", "GenerationConfigError", "GenerationResult", "GEN_STRATEGIES", "generation_inputs",
           "run_generation_benchmark", "generation_metrics", "cache_kv", "PAD_STEP"]

GEN_STRATEGIES = ("upper_bound", "atp", "text_only")
TARGET_RANGE = (0.8, 1.25)  # measured / predicted decode saving
PAD_STEP = 2  # sample b of a batch has a prompt 2 * b tokens shorter (left padding)


class GenerationConfigError(BenchConfigError):
    """A generation-benchmark setting is invalid; ``field`` names it."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise GenerationConfigError(name, f"GenerationConfig.{name}={value!r} is invalid: expected {allowed}.")


@dataclass(frozen=True)
class GenerationConfig(RunSettings):
    """What to time.

    Attributes:
        model: timing model shapes (or a preset name).
        average_tokens: ATP's target average of vision tokens over all decoder layers.
        new_tokens: tokens generated per sample (>= 2: one first token, then decode steps).
        batch_sizes: batch sizes to time (each >= 1).
        dtype, device, fast_backend: as in :class:`~atp_repro.efficiency.strategies.BenchConfig`.
        warmup, repeats: untimed and timed rounds (every strategy and batch size once per round).
        threads: torch intra-op threads (None: torch's default).
        calibration_iterations: bisection steps per module when thresholds are calibrated (batch > 1).
    """

    model: TimingModelConfig = field(default_factory=lambda: timing_model_config("cpu"))
    average_tokens: float = 144.0
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    dtype: str = "auto"
    device: str = "auto"
    fast_backend: str = "auto"
    warmup: int = 1
    repeats: int = 5
    threads: int | None = None
    calibration_iterations: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", timing_model_config(self.model))
        if isinstance(self.batch_sizes, (list, int)):
            sizes = (self.batch_sizes,) if isinstance(self.batch_sizes, int) else tuple(self.batch_sizes)
            object.__setattr__(self, "batch_sizes", sizes)
        if not isinstance(self.model, TimingModelConfig):
            _fail("model", self.model, "a TimingModelConfig or a preset name")
        if not _is_int(self.new_tokens, 2):
            _fail("new_tokens", self.new_tokens, "an int >= 2 (a first token, then at least one decode step)")
        if (not self.batch_sizes or not all(_is_int(b, 1) for b in self.batch_sizes)
                or len(set(self.batch_sizes)) != len(self.batch_sizes)):
            _fail("batch_sizes", self.batch_sizes, "distinct ints >= 1")
        max_batch = (self.model.prompt_tokens - 1) // PAD_STEP + 1
        if max(self.batch_sizes) > max_batch:
            _fail("batch_sizes", self.batch_sizes, f"sizes <= {max_batch} (sample b's prompt is {PAD_STEP} * b tokens "
                  f"shorter and prompt_tokens={self.model.prompt_tokens})")
        m = self.model
        try:
            solve_fixed_keep(self.average_tokens, module_layers=m.module_layers, num_layers=m.num_layers,
                             num_vision=m.num_vision)
        except (ValueError, TypeError) as err:
            raise GenerationConfigError("average_tokens", f"GenerationConfig.average_tokens: {err}") from None
        self.check_run_settings(_fail)
        if not _is_int(self.calibration_iterations, 1):
            _fail("calibration_iterations", self.calibration_iterations, "an int >= 1")

    @property
    def fixed_keep(self) -> tuple[int, ...]:
        m = self.model
        return solve_fixed_keep(self.average_tokens, module_layers=m.module_layers, num_layers=m.num_layers,
                                num_vision=m.num_vision)

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fixed_keep": self.fixed_keep}


def generation_inputs(cfg: TimingModelConfig, batch: int, *, dtype: torch.dtype, device: str = "cpu",
                      with_image: bool = True) -> dict[str, torch.Tensor]:
    """Timing inputs of ``batch`` samples; sample b's prompt is ``PAD_STEP * b`` tokens shorter, left-padded.

    ``with_image=False``: the same prompts without their image tokens and pixels (text only).
    """
    inputs = timing_inputs(cfg, batch=batch, dtype=dtype, device="cpu")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if not with_image:
        keep = ids[0] != IMAGE_TOKEN_ID
        ids, mask = ids[:, keep], mask[:, keep]
    rows_ids, rows_mask = [], []
    for b in range(batch):
        cut = PAD_STEP * b
        pad = torch.full((cut,), PAD_TOKEN_ID, dtype=ids.dtype)
        rows_ids.append(torch.cat([pad, ids[b, : ids.shape[1] - cut]]))
        rows_mask.append(torch.cat([torch.zeros(cut, dtype=mask.dtype), mask[b, : mask.shape[1] - cut]]))
    out = {"input_ids": torch.stack(rows_ids).to(device), "attention_mask": torch.stack(rows_mask).to(device)}
    if with_image:
        out["pixel_values"] = inputs["pixel_values"].to(device)
    return out


class _StepClock(LogitsProcessor):
    """Stamps the time at which each generation step's logits exist."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _generate(model, inputs: dict[str, torch.Tensor], new_tokens: int, clock: _StepClock | None = None,
              return_cache: bool = False):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=PAD_TOKEN_ID, use_cache=True, return_dict_in_generate=return_cache,
                              logits_processor=LogitsProcessorList([clock] if clock else []))


def cache_kv(cache) -> tuple[tuple[int, ...], int]:
    """Per-layer cached lengths and total key + value bytes of a ``DynamicCache`` (whole batch, padding included)."""
    lengths, total = [], 0
    for layer in cache.layers:
        lengths.append(int(layer.keys.shape[-2]))
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return tuple(lengths), total


def analytic_cache(shapes: ModelShapes, text_per_sample: torch.Tensor, vision: torch.Tensor | None,
                   generated: int, dtype: torch.dtype) -> tuple[tuple[int, ...], int]:
    """Per-layer cache lengths and bytes from the per-sample token counts.

    ``text_per_sample`` (B,) valid text tokens; ``vision`` (B, num_layers) vision tokens each sample
    had at each layer (None: text only); ``generated`` new tokens cached after the prompt. A layer's
    cache holds the longest sample's positions (the others are padded to it). This is the layout of
    this benchmark's inputs, whose sample 0 has no padding: before the first module the cache holds the
    whole padded prompt, which equals the longest sample only then.
    """
    batch = text_per_sample.shape[0]
    per_sample = (text_per_sample[:, None] + (vision if vision is not None else 0)).expand(batch, shapes.num_layers)
    lengths = tuple(int(x) + generated for x in per_sample.amax(0).tolist())
    element = torch.empty((), dtype=dtype).element_size()
    return lengths, batch * sum(lengths) * 2 * shapes.kv_heads * shapes.head_dim * element


def _step_flops(shapes: ModelShapes, prefill_lengths: tuple[int, ...], batch: int, steps: int) -> float:
    """Mean FLOPs of a decode step: decode step k (1..steps) sends one new query per sample against each
    layer's cache of ``prefill + k`` positions (itself included), plus the LM head."""
    total = sum(sum(sum(decoder_layer_flops(1, c + k, shapes).values()) for c in prefill_lengths)
                for k in range(1, steps + 1))
    return batch * (total / steps + 2 * shapes.hidden * shapes.vocab_size)


@dataclass
class GenerationResult:
    """``runs``: one row per timed generate; ``summary``: one row per (batch, strategy); ``metrics``:
    predicted vs measured decode savings per batch size; ``facts``: environment and settings."""

    config: GenerationConfig
    runs: pd.DataFrame
    summary: pd.DataFrame
    metrics: pd.DataFrame
    facts: dict[str, Any]


def _plans(config: GenerationConfig, base, device: str, dtype: torch.dtype) -> list[dict]:
    cfg, plans = config.model, []
    for batch in config.batch_sizes:
        inputs = generation_inputs(cfg, batch, dtype=dtype, device=device)
        text_inputs = generation_inputs(cfg, batch, dtype=dtype, device=device, with_image=False)
        if batch == 1:
            atp_cfg = ATPConfig(module_layers=cfg.module_layers, fixed_keep=config.fixed_keep, scoring_backend="fast")
            atp = apply_atp(_shared_copy(base), atp_cfg).eval()
            how = f"fixed_keep={config.fixed_keep}"
        else:
            atp_cfg = ATPConfig(module_layers=cfg.module_layers, n_target=config.average_tokens, scoring_backend="fast")
            atp = apply_atp(_shared_copy(base), atp_cfg).eval()
            with torch.inference_mode():
                calibrate_thresholds(atp, inputs, config.average_tokens, iterations=config.calibration_iterations)
            how = f"thresholds calibrated on this batch to {config.average_tokens:g}"
        for name, model, inp in (("upper_bound", base, inputs), ("atp", atp, inputs), ("text_only", base, text_inputs)):
            plans.append({"strategy": name, "batch": batch, "model": model, "inputs": inp,
                          "atp_schedule": how if name == "atp" else ""})
    return plans


def _check(plan: dict, config: GenerationConfig, shapes: ModelShapes, dtype: torch.dtype) -> dict:
    """One untimed generate: the cache's real lengths and bytes beside the analytic ones, and the counts."""
    model, inputs, n = plan["model"], plan["inputs"], config.new_tokens
    out = _generate(model, inputs, n, return_cache=True)
    lengths, kv_bytes = cache_kv(cache_of(out))
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN_ID)).sum(-1).cpu()
    vision, per_sample = None, None
    if plan["strategy"] == "atp":
        vision = token_counts(model).cpu()  # (B, layers)
        per_sample = [round(float(v), 2) for v in vision.float().mean(-1)]
    elif plan["strategy"] == "upper_bound":
        vision = torch.full((text.shape[0], shapes.num_layers), shapes.num_vision)
        per_sample = [float(shapes.num_vision)] * text.shape[0]
    # the last new token's key/value is not cached (generation stops after sampling it)
    a_lengths, a_bytes = analytic_cache(shapes, text, vision, n - 1, dtype)
    del out
    with peak_memory(config.resolved_device) as prefill_peak, torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)
    with peak_memory(config.resolved_device) as generate_peak:
        _generate(model, inputs, n)
    return {"cache_lengths": lengths, "kv_bytes": kv_bytes, "kv_bytes_analytic": a_bytes,
            "kv_equal": lengths == a_lengths and kv_bytes == a_bytes, "vision_per_sample": per_sample,
            "avg_vision_tokens": None if per_sample is None else statistics.fmean(per_sample),
            "cached_positions": sum(lengths) - shapes.num_layers * (n - 1),  # after prefill, summed over layers
            "step_flops": _step_flops(shapes, tuple(x - (n - 1) for x in lengths), text.shape[0], n - 1),
            "peak_prefill_bytes": prefill_peak[0].peak_bytes, "peak_generate_bytes": generate_peak[0].peak_bytes,
            "memory_kind": generate_peak[0].kind}


def run_generation_benchmark(config: GenerationConfig, *, run_id: str = "", progress: bool = False) -> GenerationResult:
    """Time every (batch size, strategy) of ``config`` in interleaved rounds; see the module docstring."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device, dtype, cfg = config.resolved_device, config.torch_dtype, config.model
    fast_impl = resolve_fast_backend(config.fast_backend, device)
    base = build_timing_model(cfg, dtype=dtype, device=device, attn_implementation=fast_impl)
    shapes = ModelShapes.from_config(base)
    plans = _plans(config, base, device, dtype)
    checks = {(p["batch"], p["strategy"]): _check(p, config, shapes, dtype) for p in plans}
    for _ in range(config.warmup):
        for plan in plans:
            _generate(plan["model"], plan["inputs"], config.new_tokens)
    facts = environment_facts(device, dtype)
    rows = []
    for r in range(config.repeats):
        order = plans[r % len(plans):] + plans[: r % len(plans)]
        for plan in order:
            clock = _StepClock(device)
            with measure(device) as sample:
                start = time.perf_counter()
                _generate(plan["model"], plan["inputs"], config.new_tokens, clock)
            times = clock.times
            if len(times) != config.new_tokens:
                raise RuntimeError(f"expected {config.new_tokens} generation steps, the clock saw {len(times)}")
            ttft, decode = times[0] - start, times[-1] - times[0]
            batch = plan["batch"]
            rows.append({"run_id": run_id, "strategy": plan["strategy"], "batch": batch, "round": r,
                         "ttft_s": ttft, "decode_s": decode, "total_s": sample.wall_seconds,
                         "decode_tokens_per_s": batch * (config.new_tokens - 1) / decode,
                         "new_tokens": config.new_tokens, "model": cfg.name, "attn_implementation": fast_impl,
                         **sample.row(), **facts})
            if progress:
                print(f"round {r} batch {batch} {plan['strategy']}: ttft {ttft * 1e3:.0f} ms, decode "
                      f"{decode * 1e3:.0f} ms", flush=True)
    runs = contention(pd.DataFrame(rows), by=["batch", "strategy"])
    summary = _summary(runs, plans, checks)
    metrics = generation_metrics(runs, summary)
    facts = {**facts, "fast_backend": fast_impl, "model_config": cfg.to_dict(), "rounds": config.repeats,
             "warmup": config.warmup, "new_tokens": config.new_tokens, "machine": busy_note(runs)}
    return GenerationResult(config, runs, summary, metrics, facts)


def _summary(runs: pd.DataFrame, plans: list[dict], checks: dict) -> pd.DataFrame:
    records = []
    for plan in plans:
        key = (plan["batch"], plan["strategy"])
        mine = runs[(runs.batch == key[0]) & (runs.strategy == key[1])]
        c = checks[key]
        records.append({
            "batch": key[0], "strategy": key[1], "atp_schedule": plan["atp_schedule"],
            "avg_vision_tokens": c["avg_vision_tokens"], "vision_per_sample": c["vision_per_sample"],
            "ttft_median_s": float(mine.ttft_s.median()), "decode_median_s": float(mine.decode_s.median()),
            "total_median_s": float(mine.total_s.median()),
            "decode_tokens_per_s": float(mine.decode_tokens_per_s.median()),
            "cached_positions": c["cached_positions"], "cache_lengths": c["cache_lengths"],
            "kv_bytes": c["kv_bytes"], "kv_bytes_analytic": c["kv_bytes_analytic"], "kv_equal": c["kv_equal"],
            "decode_step_flops": c["step_flops"], "peak_prefill_bytes": c["peak_prefill_bytes"],
            "peak_generate_bytes": c["peak_generate_bytes"], "memory_kind": c["memory_kind"],
            "contended_rounds": int(mine.contended.sum()),
        })
    return pd.DataFrame(records)


def _per_round(runs: pd.DataFrame, batch: int, column: str) -> pd.DataFrame:
    mine = runs[runs.batch == batch]
    return mine.pivot(index="round", columns="strategy", values=column).dropna()


def generation_metrics(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per batch size: measured and predicted decode saving (median and quartiles over rounds), their
    ratio against the 0.8-1.25 target, the FLOPs-only prediction, and the TTFT and KV reductions."""
    rows = []
    for batch in sorted(summary.batch.unique()):
        s = summary[summary.batch == batch].set_index("strategy")
        if not {"upper_bound", "atp", "text_only"} <= set(s.index):
            continue
        pos = s.cached_positions
        share = (pos["upper_bound"] - pos["atp"]) / (pos["upper_bound"] - pos["text_only"])
        t = _per_round(runs, batch, "decode_s")
        measured = 1 - t["atp"] / t["upper_bound"]
        predicted = (t["upper_bound"] - t["text_only"]) / t["upper_bound"] * share
        ratio = measured / predicted
        ttft = _per_round(runs, batch, "ttft_s")
        m, p, q = summarize(measured.tolist()), summarize(predicted.tolist()), summarize(ratio.tolist())
        flops_pred = 1 - s.decode_step_flops["atp"] / s.decode_step_flops["upper_bound"]
        rows.append({
            "batch": int(batch), "rounds": len(t),
            "avg_vision_tokens_atp": s.avg_vision_tokens["atp"],
            "decode_saving_measured": m["median"], "decode_saving_measured_q1": m["q1"],
            "decode_saving_measured_q3": m["q3"],
            "decode_saving_predicted": p["median"], "decode_saving_predicted_q1": p["q1"],
            "decode_saving_predicted_q3": p["q3"],
            "measured_over_predicted": q["median"], "measured_over_predicted_q1": q["q1"],
            "measured_over_predicted_q3": q["q3"],
            "holds": bool(TARGET_RANGE[0] <= q["median"] <= TARGET_RANGE[1]),
            "decode_saving_flops_predicted": flops_pred,
            "cache_positions_removed": share,
            "ttft_saving_measured": float((1 - ttft["atp"] / ttft["upper_bound"]).median()),
            "kv_saving": 1 - s.kv_bytes["atp"] / s.kv_bytes["upper_bound"],
            "decode_speedup": float((t["upper_bound"] / t["atp"]).median()),
        })
    return pd.DataFrame(rows)
