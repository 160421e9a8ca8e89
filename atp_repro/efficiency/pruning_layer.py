"""Time a pruning layer's attention and ATP scores alone: the only place two ATP strategies differ.

The paper's strategy and ours ("fast everywhere") run the same kernels at every non-pruning layer
and keep the same tokens. They differ only inside the three pruning layers' attention call:

- ``eager_map``: eager attention materialises the (H, L, L) probability map, and the scores are
  its column sums (the paper's strategy (2));
- ``fast_block``: the fused kernel (SDPA's CPU flash kernel, keeping its log-sum-exp) computes the
  output, and the scores come from the (vision + prompt rows) x (vision columns) block of logits
  (:func:`atp_repro.atp.scores.weighted_column_sums_from_qk`).

A whole prefill adds 29 identical layers' time, and their noise, to this difference. Timing the
attention call alone, with the real ``atp_scoring`` function and each pruning layer's sequence
length under the kept-token schedule, shows how large the difference is and how much of a
prefill it can move.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch

from atp_repro.atp.attention import ScoreRequest, atp_scoring_attention

from .models import TimingModelConfig
from .timing import summarize, synchronize

VARIANTS: tuple[str, ...] = ("eager_map", "fast_block")


class _AttentionShape(torch.nn.Module):
    """The attributes transformers' attention functions read from a ``LlamaAttention``."""

    def __init__(self, head_dim: int, groups: int) -> None:
        super().__init__()
        self.scaling = head_dim**-0.5
        self.num_key_value_groups = groups
        self.is_causal = True
        self.eval()


def pruning_layer_lengths(cfg: TimingModelConfig, keep: Sequence[int]) -> list[int]:
    """Sequence length seen by each pruning layer: all vision tokens at the first, then the schedule's."""
    if len(keep) != len(cfg.module_layers):
        raise ValueError(f"keep must give one count per ATP module ({len(cfg.module_layers)}), got {list(keep)}")
    vision = [cfg.num_vision, *keep[:-1]]
    return [cfg.text_tokens + v for v in vision]


def time_pruning_layers(
    cfg: TimingModelConfig,
    keep: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    repeats: int = 15,
    warmup: int = 2,
    device: str = "cpu",
) -> pd.DataFrame:
    """Time ``atp_scoring`` (attention output + column sums) at each pruning layer, both variants.

    Returns tidy rows ``layer, seq_len, variant, round, seconds``. Each round times every
    (layer, variant) once, variants in alternating order, so drift in machine speed is paired.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = _AttentionShape(cfg.head_dim, cfg.heads // cfg.kv_heads)
    cases = []
    for layer, seq_len in zip(cfg.module_layers, pruning_layer_lengths(cfg, keep)):
        n_vision = seq_len - cfg.text_tokens
        q = torch.randn(1, cfg.heads, seq_len, cfg.head_dim, generator=gen).to(device, dtype)  # (B, H, L, hd)
        k = torch.randn(1, cfg.kv_heads, seq_len, cfg.head_dim, generator=gen).to(device, dtype)  # (B, H_kv, L, hd)
        v = torch.randn(1, cfg.kv_heads, seq_len, cfg.head_dim, generator=gen).to(device, dtype)
        vision = slice(cfg.prefix_tokens, cfg.prefix_tokens + n_vision)
        weight = torch.zeros(1, seq_len, 2, device=device)  # (B, L, 2): vision rows, prompt rows
        weight[0, vision, 0] = 1.0
        weight[0, vision.stop:, 1] = 1.0
        cases.append((layer, seq_len, q, k, v, weight, vision))

    def run(case, variant: str) -> float:
        _, _, q, k, v, weight, vision = case
        request = ScoreRequest(weight, vision, use_eager=variant == "eager_map")
        request.base_name = "sdpa"
        synchronize(device)
        t0 = time.perf_counter()
        atp_scoring_attention(shape, q, k, v, None, scaling=shape.scaling, dropout=0.0,
                              atp_score_request=request)
        synchronize(device)
        return time.perf_counter() - t0

    rows = []
    with torch.inference_mode():
        for r in range(-warmup, repeats):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for case in cases:
                for variant in order:
                    seconds = run(case, variant)
                    if r >= 0:
                        rows.append({"layer": case[0], "seq_len": case[1], "variant": variant, "round": r,
                                     "seconds": seconds})
    return pd.DataFrame(rows)


def pruning_layer_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per pruning layer and in total: median ms of each variant and the median paired ratio.

    ``eager_over_fast`` > 1 means the fast kernel with block scores is faster at that layer; the
    ``total`` row sums the layers within each round before taking medians.
    """
    per_round = rows.pivot_table(index=["layer", "seq_len", "round"], columns="variant", values="seconds")

    def summary_row(layer: int | str, seq_len: int | None, block: pd.DataFrame) -> dict:
        ratios = summarize((block["eager_map"] / block["fast_block"]).tolist())
        return {"layer": layer, "seq_len": seq_len,
                "eager_map_ms": 1e3 * block["eager_map"].median(),
                "fast_block_ms": 1e3 * block["fast_block"].median(),
                "eager_over_fast": ratios["median"], "ratio_q1": ratios["q1"], "ratio_q3": ratios["q3"],
                "rounds": len(block)}

    out = [summary_row(layer, seq_len, block)
           for (layer, seq_len), block in per_round.groupby(level=["layer", "seq_len"], sort=False)]
    out.append(summary_row("total", None, per_round.groupby(level="round").sum()))
    return pd.DataFrame(out)
