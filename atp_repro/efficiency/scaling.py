"""How ATP's prefill saving grows with the number of image tokens (576 -> 2880).

Newer VLMs feed the language model many more vision tokens: LLaVA-NeXT encodes a base image and four
crops (5 x 576 = 2880), Qwen2-VL a resolution-dependent number. The timing model reaches those counts
with image *tiles*: ``tiles`` crops of 24 x 24 tokens each (576, 1152, 2304, 2880 for 1, 2, 4, 5
tiles), each encoded by the vision tower on its own. ATP keeps the same *fraction* at every size
(144 / 576 = 25% of the vision tokens on average over all layers), and three strategies are timed in
one interleaved run per size (Table 3's machinery):

- ``ub_fast``: the upper bound, fast kernel everywhere;
- ``atp_fast``: ATP with the fast kernel everywhere, scores from the pruning layers' queries and keys;
- ``atp_paper``: the paper's strategy, eager attention (and its (H, L, L) probability map) at the
  three pruning layers, fast kernel elsewhere.

Per size: measured / FLOPs-predicted prefill reduction of both ATP strategies against the upper
bound (per-round paired ratios, Table 3's definition), ``t(atp_paper) / t(atp_fast)``: how much
the eager map costs as it grows quadratically with the tokens, and each strategy's peak prefill
memory (measured once per strategy, in the untimed check pass).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .machine import contention
from .models import TimingModelConfig
from .report import paired_ratios
from .strategies import BenchConfig, run_benchmark
from .timing import summarize

__all__ = ["SCALING_TILES", "KEEP_FRACTION", "scaling_configs", "run_scaling", "scaling_metrics"]

SCALING_TILES = (1, 2, 4, 5)  # 576, 1152, 2304, 2880 vision tokens of 24 x 24 tiles
KEEP_FRACTION = 0.25  # 144 of 576: the paper's operating point, kept at every size
STRATEGIES = ("ub_fast", "atp_fast", "atp_paper")


def scaling_configs(model: TimingModelConfig, tiles: Sequence[int] = SCALING_TILES, *, keep_fraction: float =
                    KEEP_FRACTION, **bench: object) -> list[BenchConfig]:
    """One :class:`BenchConfig` per tile count; ``bench``: its other fields (repeats, dtype, ...).

    Raises ``ValueError`` naming ``tiles`` for a count that is not a positive int, and naming
    ``keep_fraction`` when the fraction gives an average no kept-token schedule reaches exactly.
    """
    bad = [t for t in tiles if not isinstance(t, int) or isinstance(t, bool) or t < 1]
    if not tiles or bad or len(set(tiles)) != len(tiles):
        raise ValueError(f"tiles={tuple(tiles)!r} is invalid: expected distinct ints >= 1 (vision tokens = tiles x "
                         f"{model.grid * model.grid})")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction={keep_fraction!r} is invalid: expected a fraction in (0, 1]")
    configs = []
    for t in tiles:
        cfg = model.replace(tiles=t)
        average = keep_fraction * cfg.num_vision
        try:
            configs.append(BenchConfig(model=cfg, average_tokens=average, strategies=STRATEGIES, **bench))
        except ValueError as err:
            raise ValueError(f"keep_fraction={keep_fraction!r} at tiles={t} ({cfg.num_vision} vision tokens): "
                             f"{err}") from None
    return configs


def run_scaling(configs: Sequence[BenchConfig], *, run_id: str = "", progress: bool = False) -> pd.DataFrame:
    """Run every config; returns the per-round rows of all sizes (column ``vision_tokens``)."""
    frames = []
    for config in configs:
        result = run_benchmark(config, run_id=run_id)
        runs = result.runs.assign(vision_tokens=config.model.num_vision, tiles=config.model.tiles,
                                  avg_tokens=result.summary.set_index("strategy").avg_tokens.reindex(
                                      result.runs.strategy).to_numpy())
        summary = result.summary.set_index("strategy")
        for column in ("flops", "peak_prefill_bytes"):
            runs[column] = summary[column].reindex(runs.strategy).to_numpy()
        frames.append(runs)
        if progress:
            print(f"{config.model.num_vision} vision tokens: "
                  + ", ".join(f"{s} {1e3 * runs[runs.strategy == s].seconds.median():.0f} ms" for s in STRATEGIES),
                  flush=True)
    return contention(pd.concat(frames, ignore_index=True), by=["vision_tokens", "strategy"])


def _mib(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value) / 2**20


def scaling_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """Per size: median times, peak prefill memory (MiB above the call's start; see
    :func:`~atp_repro.efficiency.machine.peak_memory`), measured / FLOPs-predicted reduction (both ATP
    strategies) and ``t(atp_paper) / t(atp_fast)`` with per-round quartiles."""
    rows = []
    for tokens, mine in runs.groupby("vision_tokens", sort=True):
        first = mine.groupby("strategy").first()
        med = mine.groupby("strategy").seconds.median()
        row = {"vision_tokens": int(tokens), "tiles": int(first.tiles.iloc[0]),
               "atp_avg_tokens": float(first.avg_tokens["atp_fast"]),
               **{f"{s}_ms": 1e3 * float(med[s]) for s in STRATEGIES},
               **{f"{s}_peak_MiB": _mib(first.peak_prefill_bytes[s]) for s in STRATEGIES}}
        for s in ("atp_fast", "atp_paper"):
            ratios = summarize(paired_ratios(mine, s, "ub_fast"))
            measured = 1 - ratios["median"]
            predicted = 1 - first.flops[s] / first.flops["ub_fast"]
            row[f"{s}_measured_over_predicted"] = measured / predicted
            row[f"{s}_evidence"] = (f"measured {measured:.1%} (t(ATP)/t(U.B.) quartiles {ratios['q1']:.3f}-"
                                    f"{ratios['q3']:.3f}), FLOPs predict {predicted:.1%}")
        ratios = summarize(paired_ratios(mine, "atp_paper", "atp_fast"))
        row.update({"paper_over_fast": ratios["median"], "paper_over_fast_q1": ratios["q1"],
                    "paper_over_fast_q3": ratios["q3"], "contended_rounds": int(mine.contended.sum())})
        rows.append(row)
    return pd.DataFrame(rows)
