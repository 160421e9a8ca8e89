"""One interleaved benchmark run on a micro model: tidy rows, exact KV bytes, tokens, metrics."""

from __future__ import annotations

import torch

from atp_repro.efficiency.models import timing_model_config
from atp_repro.efficiency.report import efficiency_metrics, table3_claims, table3_rows
from atp_repro.efficiency.strategies import STRATEGIES, BenchConfig, run_benchmark


def test_benchmark_rows_and_checks():
    model = timing_model_config("smoke", num_layers=8, module_layers=(1, 3, 5), hidden=64, heads=1, kv_heads=1,
                                ffn=96, vocab_size=64, image_size=32, patch_size=4, prefix_tokens=4, prompt_tokens=6)
    config = BenchConfig(model=model, fixed_keep=(32, 16, 8), dtype="float32", warmup=0, repeats=2)
    result = run_benchmark(config, run_id="t")
    assert len(result.runs) == 2 * len(STRATEGIES)
    for column in ("device", "dtype", "threads", "layer_backends", "attn_implementation", "seconds", "run_id"):
        assert column in result.runs.columns
    s = result.summary.set_index("strategy")
    assert (s.kv_vision_bytes_measured == s.kv_vision_bytes_analytic).all()
    assert s.loc["atp_fast", "avg_tokens"] == s.loc["atp_fast", "measured_avg_tokens"] == (2 * 64 + 2 * 32 + 2 * 16
                                                                                            + 2 * 8) / 8
    assert s.loc["atp_paper", "layer_backends"].split()[1] == "1:eager+map-scores"
    assert s.loc["atp_fast", "flops"] < s.loc["ub_fast", "flops"]
    metrics = efficiency_metrics(result.summary, result.runs)
    assert metrics.metric.str.startswith("measured / FLOPs-predicted").any()
    cells = table3_rows(result.summary)
    assert set(cells.column) == {"Avg. Token", "Accuracy", "CUDA Time (ms)", "Δ"}
    assert len(table3_claims(result.summary, result.runs)) == 4
    assert torch.get_num_threads() >= 1


def test_measured_reduction_pairs_rounds_so_that_machine_drift_cancels():
    import pandas as pd

    # The machine gets 2x slower after round 0; every round ATP takes 40% of the U.B. time.
    speed = [1.0, 2.0, 2.0]
    runs = pd.DataFrame([{"strategy": s, "round": r, "seconds": t * f}
                         for r, f in enumerate(speed) for s, t in (("ub_fast", 1.0), ("atp_fast", 0.4))]
                        + [{"strategy": "atp_fast", "round": 3, "seconds": 0.4}])  # an unpaired extra round
    summary = pd.DataFrame([
        {"strategy": "ub_fast", "median_s": 2.0, "flops": 100.0, "overhead_fraction": None, "overhead_median_s": None},
        {"strategy": "atp_fast", "median_s": 0.4, "flops": 40.0, "overhead_fraction": 0.01,
         "overhead_median_s": 0.004},
    ])
    m = efficiency_metrics(summary, runs).set_index("metric")
    row = m.loc["measured / FLOPs-predicted reduction, atp_fast vs ub_fast"]
    assert abs(row.value - 1.0) < 1e-12  # paired: 60% measured vs 60% predicted
    unpaired = efficiency_metrics(summary).set_index("metric").loc[row.name]
    assert abs(unpaired.value - (1 - 0.4 / 2.0) / 0.6) < 1e-12  # ratio of medians: 80% "measured"


def test_ratio_spread_reports_quartiles_of_the_per_round_ratios():
    import pandas as pd

    from atp_repro.efficiency.report import paired_ratio, paired_ratios, ratio_spread

    paper = [1.0, 1.1, 0.9, 1.2, 1.0]
    fast = [1.0, 1.0, 1.0, 1.0, 2.0]  # round 4: a spike in the fast strategy only
    runs = pd.DataFrame([{"strategy": s, "round": r, "seconds": t}
                         for r in range(5) for s, t in (("atp_paper", paper[r]), ("atp_fast", fast[r]))])
    ratios = paired_ratios(runs, "atp_paper", "atp_fast")
    assert ratios == [1.0, 1.1, 0.9, 1.2, 0.5]
    assert paired_ratio(runs, "atp_paper", "atp_fast") == 1.0  # the median ignores the spike
    # inclusive quartiles of [0.5, 0.9, 1.0, 1.1, 1.2]: 0.9 and 1.1
    assert ratio_spread(runs, "atp_paper", "atp_fast") == "per-round ratios: quartiles 0.900-1.100 over 5 rounds"
    assert ratio_spread(None, "atp_paper", "atp_fast") == "per-round spread not available"
    assert paired_ratio(runs, "atp_paper", "ub_fast") is None


def test_baselines_are_timed_beside_the_strategies_at_the_same_average():
    from atp_repro.baselines import stage_counts

    model = timing_model_config("smoke", num_layers=8, module_layers=(1, 3, 5), hidden=64, heads=1, kv_heads=1,
                                ffn=96, vocab_size=64, image_size=32, patch_size=4, prefix_tokens=4, prompt_tokens=6)
    config = BenchConfig(model=model, average_tokens=30.0, strategies=("ub_fast", "atp_fast"),
                         baselines=("fastv", "sparsevlm", "visionzip", "prumerge+"), dtype="float32", warmup=0,
                         repeats=2)
    result = run_benchmark(config, run_id="t")
    s = result.summary.set_index("strategy")
    assert list(s.index) == ["ub_fast", "atp_fast", "baseline_fastv", "baseline_sparsevlm", "baseline_visionzip",
                             "baseline_prumerge+"]
    # vision-side methods: every layer sees their count; the prompt (and the cache) is shorter from layer 0 on
    zip_row = s.loc["baseline_visionzip"]
    assert zip_row.avg_tokens == zip_row.measured_avg_tokens == 30.0
    for method in ("visionzip", "prumerge+"):
        row = s.loc[f"baseline_{method}"]
        assert row.avg_tokens == row.measured_avg_tokens
        assert row.kv_vision_bytes_measured == row.kv_vision_bytes_analytic
        assert row.flops < s.loc["ub_fast", "flops"] and row.layer_backends == "0-7:sdpa"
    assert abs(s.loc["baseline_prumerge+"].avg_tokens - 30.0) <= 6  # adaptive: its stride is set for ~30
    for method in ("fastv", "sparsevlm"):
        row = s.loc[f"baseline_{method}"]
        assert abs(row.avg_tokens - 30.0) <= 1.0 and row.avg_tokens == row.measured_avg_tokens
        assert row.kv_vision_bytes_measured == row.kv_vision_bytes_analytic
        assert row.flops < s.loc["ub_fast", "flops"]
        _, counts = stage_counts(method, 30.0, 8, 64)
        runs = result.runs[result.runs.strategy == f"baseline_{method}"]
        assert set(runs.fixed_keep) == {str(tuple(counts))}


def test_bad_baselines_are_named():
    import pytest

    from atp_repro.efficiency.strategies import BenchConfigError

    model = timing_model_config("smoke", num_layers=8, module_layers=(1, 3, 5), hidden=64, heads=1, kv_heads=1,
                                ffn=96, vocab_size=64, image_size=32, patch_size=4, prefix_tokens=4, prompt_tokens=6)
    with pytest.raises(BenchConfigError, match="baselines.*distinct names from"):
        BenchConfig(model=model, average_tokens=30.0, baselines=("prumerge",))
    with pytest.raises(BenchConfigError, match="average_tokens.*visionzip: a budget in"):
        BenchConfig(model=model, average_tokens=1.0, fixed_keep=(30, 20, 10), baselines=("visionzip",))
    early = timing_model_config("smoke", num_layers=8, module_layers=(0, 3, 5), hidden=64, heads=1, kv_heads=1,
                                ffn=96, vocab_size=64, image_size=32, patch_size=4, prefix_tokens=4, prompt_tokens=6)
    with pytest.raises(BenchConfigError, match="pyramiddrop: budget must be"):  # ATP reaches 10 tokens, PyramidDrop not
        BenchConfig(model=early, average_tokens=10.0, baselines=("pyramiddrop",))
