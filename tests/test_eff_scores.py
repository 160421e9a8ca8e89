"""Fast-kernel ATP scores equal eager-derived scores (max relative error <= 1e-4 in fp32)."""

from __future__ import annotations

import pytest
import torch

from atp_repro.atp.tiny import tiny_inputs, tiny_llava
from atp_repro.efficiency.models import build_timing_model, timing_inputs, timing_model_config
from atp_repro.efficiency.score_check import scoring_agreement

TOL = 1e-4


def _check(table) -> None:
    assert len(table) == 3
    worst = float(table[["max_rel_error_self", "max_rel_error_cross"]].max().max())
    assert worst <= TOL, table.to_string()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_tiny_model(kv_heads):
    model = tiny_llava(attn_implementation="sdpa", kv_heads=kv_heads)
    inputs = tiny_inputs(model, prefix_lengths=(4,), prompt_lengths=(7,), seed=2)
    _check(scoring_agreement(model, inputs, (1, 2, 3)))


def _timing(preset: str):
    cfg = timing_model_config(preset)
    model = build_timing_model(cfg, dtype=torch.float32)
    return model, timing_inputs(cfg, dtype=torch.float32), cfg.module_layers


def test_timing_model_smoke_width():
    """32 layers, modules after 4/14/24, 576 vision + 64 text tokens (narrow)."""
    _check(scoring_agreement(*_timing("smoke")))


@pytest.mark.slow
def test_timing_model_cpu_width():
    _check(scoring_agreement(*_timing("cpu")))
