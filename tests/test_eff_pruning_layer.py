"""The pruning-layer microbenchmark: one row per (round, layer, variant); summaries pair rounds."""

from __future__ import annotations

import pandas as pd
import pytest

from atp_repro.efficiency.models import timing_model_config
from atp_repro.efficiency.pruning_layer import (
    VARIANTS,
    pruning_layer_lengths,
    pruning_layer_summary,
    time_pruning_layers,
)


def _micro():
    return timing_model_config("smoke", num_layers=8, module_layers=(1, 3, 5), hidden=64, heads=2, kv_heads=1,
                               ffn=96, vocab_size=64, image_size=32, patch_size=4, prefix_tokens=4, prompt_tokens=6)


def test_lengths_follow_the_schedule():
    cfg = _micro()  # 64 vision tokens, 10 text tokens
    assert pruning_layer_lengths(cfg, (32, 16, 8)) == [74, 42, 26]
    with pytest.raises(ValueError, match="keep must give one count per ATP module"):
        pruning_layer_lengths(cfg, (32, 16))


def test_rows_cover_every_round_layer_and_variant():
    rows = time_pruning_layers(_micro(), (32, 16, 8), repeats=3, warmup=1)
    assert len(rows) == 3 * 3 * len(VARIANTS)
    assert set(rows.variant) == set(VARIANTS) and sorted(rows["round"].unique()) == [0, 1, 2]
    assert (rows.seconds > 0).all()
    summary = pruning_layer_summary(rows)
    assert summary.layer.tolist() == [1, 3, 5, "total"]
    with pytest.raises(ValueError, match="repeats"):
        time_pruning_layers(_micro(), (32, 16, 8), repeats=0)


def test_summary_pairs_rounds_and_sums_layers_per_round():
    # Round 1 runs 2x slower for both variants; eager is 3x the fast variant at layer 1, equal at layer 3.
    rows = pd.DataFrame([
        {"layer": layer, "seq_len": n, "variant": variant, "round": r, "seconds": base * speed * factor}
        for r, speed in ((0, 1.0), (1, 2.0))
        for layer, n, base, eager_factor in ((1, 74, 0.3, 3.0), (3, 42, 0.1, 1.0))
        for variant, factor in (("eager_map", eager_factor), ("fast_block", 1.0))
    ])
    s = pruning_layer_summary(rows).set_index("layer")
    assert s.loc[1, "eager_over_fast"] == pytest.approx(3.0)
    assert s.loc[3, "eager_over_fast"] == pytest.approx(1.0)
    assert s.loc["total", "eager_over_fast"] == pytest.approx((0.9 + 0.1) / (0.3 + 0.1))
    assert s.loc[1, "eager_map_ms"] == pytest.approx(1e3 * 0.9 * 1.5)  # median of 0.9 s and 1.8 s
