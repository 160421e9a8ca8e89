"""Generation benchmark, image tiles (576 -> 2880 tokens), scaling configs, and the machine measurements."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

from atp_repro.atp import ATPConfig, apply_atp, token_counts
from atp_repro.atp.spatial import vision_grid
from atp_repro.efficiency.generation import (
    GenerationConfig,
    GenerationConfigError,
    _generate,
    _plans,
    generation_inputs,
    generation_metrics,
    run_generation_benchmark,
)
from atp_repro.efficiency.kv_cache import cache_of
from atp_repro.efficiency.machine import busy_note, contention, measure, peak_memory
from atp_repro.efficiency.models import build_timing_model, timing_inputs, timing_model_config
from atp_repro.efficiency.scaling import scaling_configs

# 8 layers, modules after 1 / 3 / 5, a 6 x 6 grid (36 vision tokens per tile), short prompts
TINY = timing_model_config("smoke", num_layers=8, module_layers=(1, 3, 5), hidden=64, heads=2, kv_heads=2, ffn=128,
                           vocab_size=64, vision_hidden=32, vision_heads=2, vision_ffn=64, vision_layers=1,
                           image_size=84, prefix_tokens=4, prompt_tokens=16)


def _config(**changes) -> GenerationConfig:
    base = dict(model=TINY, average_tokens=18.0, new_tokens=3, batch_sizes=(1, 8), dtype="float32", device="cpu",
                warmup=0, repeats=2, calibration_iterations=12)
    return GenerationConfig(**{**base, **changes})


@pytest.mark.parametrize("field, value, words", [
    ("new_tokens", -1, "an int >= 2"),
    ("new_tokens", 1, "an int >= 2"),
    ("batch_sizes", (0,), "distinct ints >= 1"),
    ("batch_sizes", (1, 1), "distinct ints >= 1"),
    ("batch_sizes", (9,), "sizes <= 8"),
    ("average_tokens", 5.0, "not reachable"),
    ("repeats", 0, "an int >= 1"),
    ("dtype", "fp8", "one of"),
])
def test_generation_config_names_the_bad_argument(field, value, words):
    with pytest.raises(GenerationConfigError, match=words) as err:
        _config(**{field: value})
    assert err.value.field == field
    assert field in str(err.value)


def test_scaling_configs_name_bad_tiles_and_fractions():
    with pytest.raises(ValueError, match=r"tiles=\(0, 2\).*ints >= 1"):
        scaling_configs(TINY, (0, 2))
    with pytest.raises(ValueError, match="tiles="):
        scaling_configs(TINY, (2, 2))
    with pytest.raises(ValueError, match="keep_fraction"):
        scaling_configs(TINY, (1,), keep_fraction=1.5)
    configs = scaling_configs(TINY, (1, 2, 5), repeats=1)
    assert [c.model.num_vision for c in configs] == [36, 72, 180]
    assert [c.average_tokens for c in configs] == [9.0, 18.0, 45.0]


def test_vision_grid_reads_tiles_and_refuses_other_counts():
    assert vision_grid(576) == (24, 1)
    assert vision_grid(576, 24) == (24, 1)
    assert vision_grid(2880, 24) == (24, 5)
    assert vision_grid(1152, 24) == (24, 2)
    assert vision_grid(64, 24) == (8, 1)  # a smaller square span (e.g. pooled features) stays square
    with pytest.raises(ValueError, match="square vision grid or a multiple of the vision tower's 24 x 24"):
        vision_grid(1000, 24)


def test_tiled_keep_all_equals_stock_and_pruning_keeps_tiles_apart():
    cfg = TINY.replace(tiles=3)
    model = build_timing_model(cfg, dtype=torch.float32)
    inputs = timing_inputs(cfg, batch=2, dtype=torch.float32)
    assert inputs["pixel_values"].shape[0] == 6 and int((inputs["input_ids"][0] == 4).sum()) == 108
    with torch.inference_mode():
        stock = model(**inputs).logits
    keep_all = apply_atp(build_timing_model(cfg, dtype=torch.float32),
                         ATPConfig(module_layers=cfg.module_layers, fixed_keep=(108, 108, 108))).eval()
    with torch.inference_mode():
        assert torch.equal(keep_all(**inputs).logits, stock)
    # the uniform control ranks positions by the spatial grids alone: kept sets show the per-tile tables
    pruned = apply_atp(build_timing_model(cfg, dtype=torch.float32),
                       ATPConfig(module_layers=cfg.module_layers, importance="uniform", fixed_keep=(30, 15, 6))).eval()
    with torch.inference_mode():
        pruned(**inputs)
    from atp_repro.atp import last_atp_record

    kept = last_atp_record(pruned).kept_vision_indices[0][0]
    assert len(kept) == 30
    tiles_hit = set((kept // 36).tolist())
    assert tiles_hit == {0, 1, 2}  # the spatial skeleton is sampled in every tile
    # the same positions of every tile survive (each tile sampled by the same grids)
    per_tile = [set((kept[kept // 36 == t] % 36).tolist()) for t in range(3)]
    assert per_tile[0] == per_tile[1] == per_tile[2]


@pytest.fixture(scope="module")
def result():
    return run_generation_benchmark(_config())


def test_generation_kv_bytes_equal_an_independent_cache(result):
    config = result.config
    base = build_timing_model(TINY, dtype=torch.float32)
    for row in result.summary.itertuples():
        inputs = generation_inputs(TINY, row.batch, dtype=torch.float32, with_image=row.strategy != "text_only")
        model = base
        if row.strategy == "atp" and row.batch == 1:
            model = apply_atp(build_timing_model(TINY, dtype=torch.float32),
                              ATPConfig(module_layers=TINY.module_layers, fixed_keep=config.fixed_keep,
                                        scoring_backend="fast")).eval()
        elif row.strategy == "atp":
            continue  # calibrated on the batch inside the benchmark: its bytes are checked by kv_equal below
        cache = cache_of(_generate(model, inputs, config.new_tokens, return_cache=True))
        total = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                    for layer in cache.layers)
        assert total == row.kv_bytes, (row.batch, row.strategy)
    assert result.summary.kv_equal.all()
    ub = result.summary.set_index(["batch", "strategy"]).kv_bytes
    assert ub[(1, "atp")] < ub[(1, "upper_bound")] and ub[(8, "atp")] < ub[(8, "upper_bound")]


def test_batch_of_8_keeps_each_samples_own_count():
    config = _config()
    base = build_timing_model(TINY, dtype=torch.float32)
    plan = next(p for p in _plans(config, base, "cpu", torch.float32) if p["strategy"] == "atp" and p["batch"] == 8)
    model, inputs = plan["model"], plan["inputs"]
    with torch.inference_mode():
        model(**inputs)
    batched = token_counts(model).clone()
    assert len(set(batched.float().mean(-1).tolist())) > 1, "calibrated thresholds should give per-sample counts"
    assert abs(float(batched.float().mean()) - config.average_tokens) < 3
    for b in range(8):
        valid = inputs["attention_mask"][b].bool()
        single = {"input_ids": inputs["input_ids"][b:b + 1, valid],
                  "attention_mask": inputs["attention_mask"][b:b + 1, valid],
                  "pixel_values": inputs["pixel_values"][b:b + 1]}
        with torch.inference_mode():
            model(**single)
        assert torch.equal(token_counts(model)[0], batched[b]), b


def test_generation_metrics_and_rows(result):
    assert set(result.runs.strategy) == {"upper_bound", "atp", "text_only"}
    assert len(result.runs) == 2 * 3 * 2  # batch sizes x strategies x rounds
    assert {"load1", "cpu_seconds", "cpu_per_wall", "contended", "dtype"} <= set(result.runs.columns)
    m = result.metrics.set_index("batch")
    assert list(m.index) == [1, 8]
    assert (m.kv_saving > 0.3).all() and (m.cache_positions_removed > 0).all()
    assert m.loc[1, "avg_vision_tokens_atp"] == pytest.approx(18.0)


def test_contention_flags_rounds_that_lost_cores():
    runs = pd.DataFrame({"strategy": ["a"] * 5 + ["b"] * 3, "cpu_per_wall": [1.9, 1.8, 1.9, 0.7, 1.85, 1.0, 1.0, 0.95],
                         "load1": [0.5] * 7 + [4.0]})
    flagged = contention(runs, cores=2)
    assert flagged.contended.tolist() == [False, False, False, True, False, False, False, False]
    assert flagged.busy_at_start.tolist() == [False] * 7 + [True]
    assert busy_note(flagged, cores=2).startswith("WARNING: busy machine: 1 of 8")
    quiet = contention(runs.iloc[:3], cores=2)
    assert busy_note(quiet, cores=2).startswith("machine quiet")


def test_measure_and_peak_memory_see_work():
    with measure() as sample:
        torch.ones(512, 512) @ torch.ones(512, 512)
    assert sample.wall_seconds > 0 and sample.cpu_seconds >= 0
    with peak_memory() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block += 1
        del block
    if sys.platform == "linux":
        assert peak[0].kind == "cpu_rss"
        assert peak[0].peak_bytes >= 48 * 2**20


def test_decode_prediction_arithmetic_on_a_machine_that_follows_the_model():
    """A machine whose decode step costs exactly t0 + beta * S gives measured / predicted = 1."""
    t0, beta = 0.010, 1e-6
    positions = {"upper_bound": 20480, "atp": 6656, "text_only": 2048}
    summary = pd.DataFrame([{"batch": 1, "strategy": k, "cached_positions": v, "avg_vision_tokens": 144.0,
                             "decode_step_flops": 100.0, "kv_bytes": v} for k, v in positions.items()])
    runs = pd.DataFrame([{"batch": 1, "strategy": k, "round": r, "decode_s": (t0 + beta * v) * (1 + 0.1 * r),
                          "ttft_s": 1.0} for r in range(3) for k, v in positions.items()])
    m = generation_metrics(runs, summary).iloc[0]
    assert m.measured_over_predicted == pytest.approx(1.0)
    assert m.decode_saving_measured == pytest.approx(beta * (20480 - 6656) / (t0 + beta * 20480))
    slow_atp = runs.assign(decode_s=runs.decode_s.where(runs.strategy != "atp", runs.decode_s * 1.3))
    assert generation_metrics(slow_atp, summary).iloc[0].measured_over_predicted < 0.8


def test_tile_side_survives_copies_and_pickles():
    import copy
    import pickle

    model = apply_atp(build_timing_model(TINY.replace(tiles=2), dtype=torch.float32),
                      ATPConfig(module_layers=TINY.module_layers))
    runtime = model.model.language_model._atp_runtime
    assert runtime.tile_side == 6
    for clone in (copy.deepcopy(runtime), pickle.loads(pickle.dumps(runtime))):
        assert clone.tile_side == 6 and clone.config == runtime.config and clone.record is None
    square = apply_atp(build_timing_model(TINY, dtype=torch.float32), ATPConfig(module_layers=TINY.module_layers))
    assert square.model.language_model._atp_runtime.tile_side is None  # one grid: read as a square span


def test_vision_side_baselines_refuse_tiled_inputs():
    from atp_repro.efficiency.strategies import BenchConfig, BenchConfigError

    with pytest.raises(BenchConfigError, match="baselines.*tiles=2"):
        BenchConfig(model=TINY.replace(tiles=2), average_tokens=18.0, baselines=("visionzip",))
