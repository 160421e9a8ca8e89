"""FLOPs formula vs FlopCounterMode, KV-cache bytes measured vs analytic, schedule solver."""

from __future__ import annotations

import pytest
import torch

from atp_repro import ATPConfig, apply_atp, token_counts
from atp_repro.atp.tiny import tiny_inputs, tiny_llava
from atp_repro.efficiency.flops import ModelShapes, atp_scoring_flops, measure_flops, prefill_flops
from atp_repro.efficiency.kv_cache import analytic_kv_bytes, cache_of, measure_kv_cache
from atp_repro.efficiency.models import (
    average_vision_tokens,
    build_timing_model,
    layer_vision_counts,
    solve_fixed_keep,
    timing_inputs,
    timing_model_config,
)

LAYERS = (1, 2, 3)
KEEP = (32, 16, 8)


def _threshold_flops(model) -> int:
    """Matmul FLOPs of the threshold networks (one feature row per module and sample)."""
    total = 0
    for module in model.model.language_model.atp_modules:
        for linear in module.threshold_net.modules():
            if isinstance(linear, torch.nn.Linear):
                total += 2 * linear.in_features * linear.out_features
    return total


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_formula_equals_flop_counter_on_the_stock_model(kv_heads):
    model = tiny_llava(attn_implementation="eager", kv_heads=kv_heads)
    inputs = tiny_inputs(model)
    shapes = ModelShapes.from_config(model)
    text = inputs["input_ids"].shape[1] - shapes.num_vision
    assert measure_flops(model, inputs, logits_to_keep=1) == prefill_flops(shapes, text).total


@pytest.mark.parametrize("scoring", ["eager", "fast"])
def test_formula_with_pruned_lengths_equals_flop_counter_on_atp(scoring):
    impl = "eager" if scoring == "eager" else "sdpa"  # sdpa's CPU kernel is invisible to the counter: only scores
    model = apply_atp(tiny_llava(attn_implementation=impl, kv_heads=2),
                      ATPConfig(module_layers=LAYERS, fixed_keep=KEEP, scoring_backend=scoring))
    inputs = tiny_inputs(model)
    shapes = ModelShapes.from_config(model)
    text = inputs["input_ids"].shape[1] - shapes.num_vision
    counts = layer_vision_counts(KEEP, LAYERS, shapes.num_layers, shapes.num_vision)
    measured = measure_flops(model, inputs, logits_to_keep=1)
    assert token_counts(model)[0].tolist() == counts
    first_vision = 3  # tiny_inputs: [bos, 2 prefix tokens, image...]
    scores = sum(atp_scoring_flops(shapes, scoring, text + n, first_vision, n) for n in (64, 32, 16))
    predicted = prefill_flops(shapes, text, counts)
    if scoring == "eager":
        assert measured == predicted.total + scores + _threshold_flops(model)
    else:
        attention = sum(2 * 2 * shapes.heads * n * n * shapes.head_dim for n in predicted.seq_lens)
        tokens = shapes.num_vision + 1  # the vision tower's SDPA attention is invisible too
        attention += shapes.vision_layers * 2 * 2 * tokens * tokens * shapes.vision_hidden
        assert measured == predicted.total - attention + scores + _threshold_flops(model)


def test_kv_bytes_measured_from_the_cache_equal_the_analytic_value_at_bf16():
    cfg = timing_model_config("smoke", num_layers=8, module_layers=(1, 3, 5), hidden=128, heads=1, kv_heads=1,
                              ffn=64, vocab_size=64, image_size=96, patch_size=4, prefix_tokens=5, prompt_tokens=7)
    model = build_timing_model(cfg, dtype=torch.bfloat16)
    keep = (300, 100, 40)
    atp = apply_atp(model, ATPConfig(module_layers=cfg.module_layers, fixed_keep=keep))
    with torch.inference_mode():
        out = atp(**timing_inputs(cfg), use_cache=True, logits_to_keep=1)
    measured = measure_kv_cache(cache_of(out), cfg.prefix_tokens, cfg.prompt_tokens)
    counts = layer_vision_counts(keep, cfg.module_layers, cfg.num_layers, cfg.num_vision)
    assert measured.dtype == "bfloat16"
    assert measured.vision_bytes == analytic_kv_bytes(ModelShapes.from_config(model), counts, dtype=torch.bfloat16)
    assert measured.layer_lengths == tuple(c + cfg.text_tokens for c in counts)


def test_schedule_solver_hits_the_average_exactly():
    keep = solve_fixed_keep(144)
    assert average_vision_tokens(keep, (4, 14, 24), 32, 576) == 144
    assert list(keep) == sorted(keep, reverse=True)
    assert average_vision_tokens(solve_fixed_keep(88, module_layers=(3, 13, 23)), (3, 13, 23), 32, 576) == 88
    with pytest.raises(ValueError, match=r"target_average=88 .*\[90, 576\]"):
        solve_fixed_keep(88)
