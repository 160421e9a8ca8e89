"""Training-free baselines (FastV, PyramidDrop, uniform and random controls) on transformers' LLaVA.

The methods before the language model (VisionZip, PruMerge+) have the same guarantees tested in
test_prellm.py (their counts and caches are not ATP's); keep-all == stock is tested here for all."""

from __future__ import annotations

import pytest
import torch

from atp_repro import last_atp_record, token_counts
from atp_repro.atp.controls import control_scores, van_der_corput
from atp_repro.atp.tiny import IMAGE_TOKEN_ID, single_inputs, tiny_inputs, tiny_llava
from atp_repro.baselines import (
    IN_LLM_METHODS,
    METHODS,
    apply_baseline,
    fastv_layer,
    pyramiddrop_layers,
    sparsevlm_layers,
    stage_counts,
)

NUM_LAYERS = 8
GRID = 8
N = GRID * GRID


def _model(method: str, budget: float, impl: str = "sdpa", seed: int = 0, **kw):
    return apply_baseline(tiny_llava(num_layers=NUM_LAYERS, grid=GRID, attn_implementation=impl, seed=seed),
                          method, budget, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_keeping_every_token_reproduces_the_stock_model(method, impl):
    stock = tiny_llava(num_layers=NUM_LAYERS, grid=GRID, attn_implementation=impl)
    model = _model(method, float(N), impl)
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, atol=1e-5, rtol=0)
    expected = stock.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize("method", IN_LLM_METHODS)
@pytest.mark.parametrize("budget", [14.0, 20.5, 33.0])
def test_measured_tokens_are_within_one_of_the_budget(method, budget):
    # PyramidDrop's own stage ends (after 2 of 8 layers) cannot go below 16 tokens; start it earlier.
    model = _model(method, budget, layers=(1, 4, 6) if method == "pyramiddrop" else None)
    with torch.no_grad():
        model(**tiny_inputs(model, prefix_lengths=(3, 5), prompt_lengths=(6, 2)))
    measured = token_counts(model).float().mean(-1)  # per sample, over decoder layers
    assert (measured - budget).abs().max() <= 1.0, measured


@pytest.mark.parametrize("method", IN_LLM_METHODS)
def test_left_padded_batch_equals_single_runs(method):
    model = _model(method, 20.0, seed=1)
    batch = tiny_inputs(model, prefix_lengths=(2, 4, 3), prompt_lengths=(7, 3, 5), seed=3)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    batch_kept = last_atp_record(model).kept_vision_indices
    for i in range(3):
        single = single_inputs(batch, i)
        out = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert torch.equal(out[0, -5:], generated[i, -5:]), f"{method}: sample {i} differs"
        for m, per_sample in enumerate(last_atp_record(model).kept_vision_indices):
            assert torch.equal(per_sample[0], batch_kept[m][i]), (method, m, i)


@pytest.mark.parametrize("method", IN_LLM_METHODS)
def test_cached_generation_equals_recomputation(method):
    model = _model(method, 16.0)
    inputs = tiny_inputs(model, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    with_cache = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
    without_cache = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_fastv_keeps_the_top_tokens_of_the_last_prompt_tokens_attention():
    """Recomputed from the stock model's attention map of layer K - 1 (FastV's rule), per sample."""
    stock = tiny_llava(num_layers=NUM_LAYERS, grid=GRID, attn_implementation="eager")
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2), seed=2)
    with torch.no_grad():
        attentions = stock(**inputs, output_attentions=True).attentions
    k_layer = fastv_layer(NUM_LAYERS)
    _, (keep,) = stage_counts("fastv", 20.0, NUM_LAYERS, N)
    model = _model("fastv", 20.0, impl="eager")
    with torch.no_grad():
        model(**inputs)
    kept = last_atp_record(model).kept_vision_indices[0]
    for b in range(2):
        vision = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        last_row = attentions[k_layer - 1][b, :, -1, :].mean(0)  # (L,) head-averaged, from the last token
        expected = last_row[vision].topk(keep).indices.sort().values
        assert torch.equal(kept[b], expected), b
        # and not the opposite rule
        assert not torch.equal(kept[b], last_row[vision].topk(keep, largest=False).indices.sort().values)


def test_pyramiddrop_stage_counts_follow_one_ratio():
    # PyramidDrop's published LLaVA-1.5 setting: lambda = 0.5 at layers 8, 16, 24 of 32 averages 270 tokens.
    starts, counts = stage_counts("pyramiddrop", 270.0, 32, 576)
    assert starts == (8, 16, 24) == pyramiddrop_layers(32)
    assert counts == (288, 144, 72)
    model = _model("pyramiddrop", 30.0)
    with torch.no_grad():
        model(**tiny_inputs(model))
    per_layer = token_counts(model)[0].tolist()
    starts, counts = stage_counts("pyramiddrop", 30.0, NUM_LAYERS, N)
    assert per_layer == [N] * starts[0] + [counts[0]] * (starts[1] - starts[0]) + [counts[1]] * (
        starts[2] - starts[1]) + [counts[2]] * (NUM_LAYERS - starts[2])


def test_uniform_control_spreads_over_the_image_and_random_is_fixed():
    model = _model("uniform", (N * 1 + 7 * 8) / 8)  # keeps 8 tokens after layer 1
    with torch.no_grad():
        model(**tiny_inputs(model, prefix_lengths=(3, 5), prompt_lengths=(6, 2)))
    kept = last_atp_record(model).kept_vision_indices[0]
    assert torch.equal(kept[0], kept[1])  # image-independent
    rows, cols = kept[0] // GRID, kept[0] % GRID
    quadrants = {(int(r) >= GRID // 2, int(c) >= GRID // 2) for r, c in zip(rows, cols)}
    assert len(quadrants) == 4, kept[0]
    assert torch.equal(control_scores("random", GRID, (2, 4), 2.0), control_scores("random", GRID, (2, 4), 2.0))
    assert van_der_corput(4).tolist() == [0.0, 0.5, 0.25, 0.75]


def test_bad_inputs_fail_before_any_work():
    with pytest.raises(ValueError, match="method must be one of"):
        stage_counts("fastvv", 20.0, NUM_LAYERS, N)
    with pytest.raises(ValueError, match=r"budget .* \[8, 64\]"):  # layer 0 alone averages 64 / 8
        stage_counts("fastv", 5.0, NUM_LAYERS, N)
    with pytest.raises(ValueError, match="budget"):
        stage_counts("random", float("nan"), NUM_LAYERS, N)
    with pytest.raises(ValueError, match="layers"):
        stage_counts("fastv", 20.0, NUM_LAYERS, N, layers=(1, 3))
    with pytest.raises(ValueError, match="layers"):
        stage_counts("pyramiddrop", 40.0, NUM_LAYERS, N, layers=(4, 2))


def test_cli_offers_every_method_and_rejects_bad_combinations():
    import subprocess
    import sys

    from atp_repro.mini.commands import BASELINES

    assert BASELINES == METHODS
    bad = subprocess.run([sys.executable, "-m", "atp_repro", "eval", "--baseline", "fastv", "--stage", "atp"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--baseline runs on the upper bound" in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "atp_repro", "eval", "--baseline", "fastvv"],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "fastv" in unknown.stderr


def test_prefill_flops_fraction_counts_each_question_with_its_own_lengths():
    import numpy as np
    import pandas as pd

    from atp_repro.efficiency.flops import ModelShapes, prefill_flops
    from atp_repro.mini.comparison import prefill_flops_fraction
    from atp_repro.mini.evaluate import EvalResult

    model = tiny_llava(num_layers=NUM_LAYERS, grid=GRID)
    full = np.full((2, NUM_LAYERS), N)
    result = EvalResult(pd.DataFrame({"family": ["a", "a"]}), full, GRID, 0.0)
    assert prefill_flops_fraction(result, model, [5, 9]) == pytest.approx(1.0)
    kept = np.array([[N] + [16] * 7, [N] + [4] * 7])
    shapes = ModelShapes.from_config(model)
    expected = (prefill_flops(shapes, 5, kept[0]).total + prefill_flops(shapes, 9, kept[1]).total) / (
        prefill_flops(shapes, 5).total + prefill_flops(shapes, 9).total)
    got = prefill_flops_fraction(EvalResult(result.records, kept, GRID, 0.0), model, [5, 9])
    assert got == pytest.approx(expected) and got < 1.0
    with pytest.raises(ValueError, match="lengths"):
        prefill_flops_fraction(result, model, [5])


def test_sparsevlm_kept_set_matches_an_independent_recomputation():
    """Raters from the input embeddings, then the head-averaged attention from the raters of the first
    pruning layer, read from the stock model's output_attentions: its top-k is the kept set."""
    stock = tiny_llava(num_layers=NUM_LAYERS, grid=GRID, attn_implementation="eager")
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(9, 7), seed=3)
    with torch.no_grad():
        out = stock(**inputs, output_attentions=True, output_hidden_states=True)
    starts, counts = stage_counts("sparsevlm", 20.0, NUM_LAYERS, N)
    assert starts == sparsevlm_layers(NUM_LAYERS) == (1, 2, 4)  # after layers 2, 6, 15 of 32, on 8
    model = _model("sparsevlm", 20.0, impl="eager")
    with torch.no_grad():
        model(**inputs)
    kept = last_atp_record(model).kept_vision_indices[0]
    embeds = out.hidden_states[0]  # the language model's input embeddings (image features in place)
    for b in range(2):
        ids = inputs["input_ids"][b]
        vision = (ids == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        prompt = torch.arange(int(vision[-1]) + 1, len(ids))
        relevance = torch.softmax(embeds[b, vision] @ embeds[b, prompt].T, dim=-1).mean(0)
        raters = prompt[relevance > relevance.mean()]
        assert 0 < len(raters) < len(prompt)  # the case tests the rater choice
        rows = out.attentions[starts[0] - 1][b].mean(0)[raters][:, vision]  # (raters, V)
        expected = rows.mean(0).topk(counts[0]).indices.sort().values
        assert torch.equal(kept[b], expected), b
        everyone = out.attentions[starts[0] - 1][b].mean(0)[prompt][:, vision].mean(0)
        assert not torch.equal(kept[b], everyone.topk(counts[0]).indices.sort().values)  # raters matter
