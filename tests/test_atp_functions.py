"""Unit tests of ATP's pure tensor functions (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

from atp_repro import ATPConfig, proportional_module_layers
from atp_repro.atp.attention import to_additive_mask
from atp_repro.atp.loss import budget_terms, per_layer_counts
from atp_repro.atp.masks import (
    attention_log_bias,
    causal_mask_corner,
    compaction_index,
    flat_positions,
    gather_positions,
    hard_keep,
    soft_keep,
    top_k_keep,
)
from atp_repro.atp.positions import rope2d_cos_sin
from atp_repro.atp.scores import (
    cross_modality_importance,
    masked_quantiles,
    normalise_scores,
    self_modality_importance,
    weighted_column_sums,
    weighted_column_sums_from_qk,
)
from atp_repro.atp.spatial import grid_size_for, sparsest_stride, spatial_scores
from atp_repro.atp.thresholds import ThresholdNetwork


def test_proportional_layers_match_the_paper_at_32_layers():
    assert proportional_module_layers(32) == (4, 14, 24)
    layers = proportional_module_layers(8)
    assert len(set(layers)) == 3 and max(layers) <= 6
    with pytest.raises(ValueError, match="too shallow"):
        proportional_module_layers(3)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"module_layers": (4, 4, 24)}, "module_layers"),
        ({"position_encoding": "sinusoid"}, "position_encoding"),
        ({"lambda_sample": 5.0}, "lambda_sample"),
        ({"fixed_keep": (10, -1, 3)}, "fixed_keep"),
        ({"scoring_backend": "flash"}, "scoring_backend"),
    ],
)
def test_config_errors_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ATPConfig(**kwargs)


def test_config_round_trips_through_json(tmp_path):
    config = ATPConfig(fixed_keep=(100, 50, 20), position_encoding="learned2d")
    config.save(tmp_path / "atp.json")
    assert ATPConfig.load(tmp_path / "atp.json") == config
    with pytest.raises(ValueError, match="unknown key"):
        ATPConfig.from_dict({"temprature": 1.0})


def test_spatial_scores_follow_the_sparsest_grid():
    strides = (2, 3, 4, 6, 8, 12)
    stride = sparsest_stride(24, strides).reshape(24, 24)
    scores = spatial_scores(24, strides, 2.0).reshape(24, 24)
    assert scores.min() == 0 and scores.max() < 1
    # Nested: every token of a sparse grid is on every grid whose stride divides it.
    on_12 = stride == 12
    assert on_12.sum() == 4
    assert torch.allclose(scores[on_12], torch.tensor(1 - 2.0 / 144))
    assert torch.allclose(scores[stride == 2], torch.tensor(1 - 2.0 / 4))
    assert (scores[stride == 0] == 0).all()
    # A sparser grid scores higher.
    levels = [float(scores[stride == s][0]) for s in sorted(strides)]
    assert levels == sorted(levels)
    with pytest.raises(ValueError, match="perfect square"):
        grid_size_for(50)


def test_self_importance_averages_over_causally_visible_vision_queries():
    # 1 text token, 3 vision tokens; attention rows are causal.
    probs = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.4, 0.4, 0], [0.1, 0.3, 0.2, 0.4]])
    vision = torch.tensor([[0.0, 1, 1, 1]])
    sums = weighted_column_sums(probs[None, None], vision[..., None])[..., 0]
    got = self_modality_importance(sums, vision)
    expected = torch.tensor([[0.0, (0.5 + 0.4 + 0.3) / 3, (0.4 + 0.2) / 2, 0.4 / 1]])
    # Position 0 is text: it is "seen" by 3 vision queries too, but callers read vision positions only.
    torch.testing.assert_close(got[:, 1:], expected[:, 1:])


def test_cross_importance_is_the_mean_over_prompt_queries():
    probs = torch.rand(1, 2, 5, 5).softmax(-1)
    prompt = torch.tensor([[0.0, 0, 0, 1, 1]])
    sums = weighted_column_sums(probs, prompt[..., None])[..., 0]
    got = cross_modality_importance(sums, prompt)
    torch.testing.assert_close(got[0], probs[0].mean(0)[3:].mean(0))


@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_lse, row_chunk", [(False, 256), (True, 256), (False, 5), (True, 5)])
def test_scores_from_qk_equal_scores_from_the_probability_map(gqa, masked, with_lse, row_chunk):
    torch.manual_seed(0)
    batch, heads, length, dim = 2, 4, 12, 8
    query = torch.randn(batch, heads, length, dim)
    key = torch.randn(batch, heads // gqa, length, dim)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if masked:
        valid[1, :3] = False
    additive = to_additive_mask(valid.long() if masked else None, length, length, torch.float32, query.device)
    logits = query @ key.repeat_interleave(gqa, 1).transpose(-1, -2) / math.sqrt(dim) + additive
    probs = logits.softmax(-1)
    weights = torch.rand(batch, length, 2) * (torch.arange(length) >= 4)[None, :, None]
    expected = weighted_column_sums(probs, weights)
    lse = torch.logsumexp(logits, dim=-1) if with_lse else None
    got = weighted_column_sums_from_qk(query, key, additive if masked else None, 1 / math.sqrt(dim), weights,
                                       slice(4, 10), logsumexp=lse, head_chunk=3, row_chunk=row_chunk)
    torch.testing.assert_close(got[:, 4:10], expected[:, 4:10], atol=1e-6, rtol=1e-4)
    assert (got[:, :4] == 0).all() and (got[:, 10:] == 0).all()


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("row_chunk", [3, 256])
def test_scores_from_qk_with_a_cached_prefix_follow_the_shifted_causal_diagonal(with_lse, row_chunk):
    """Keys = a 5-token cache prefix + the queries: query i sees keys 0..i + 5."""
    torch.manual_seed(1)
    batch, heads, q_len, prefix, dim = 1, 2, 9, 5, 8
    query = torch.randn(batch, heads, q_len, dim)
    key = torch.randn(batch, heads, prefix + q_len, dim)
    additive = to_additive_mask(None, q_len, prefix + q_len, torch.float32, query.device)
    logits = query @ key.transpose(-1, -2) / math.sqrt(dim) + additive
    weights = torch.rand(batch, q_len, 2)
    expected = weighted_column_sums(logits.softmax(-1), weights)
    lse = torch.logsumexp(logits, dim=-1) if with_lse else None
    got = weighted_column_sums_from_qk(query, key, None, 1 / math.sqrt(dim), weights, slice(2, 12), logsumexp=lse,
                                       row_chunk=row_chunk)
    torch.testing.assert_close(got[:, 2:12], expected[:, 2:12], atol=1e-6, rtol=1e-4)
    assert (got[:, :2] == 0).all() and (got[:, 12:] == 0).all()


def test_normalisation_ignores_invalid_positions():
    scores = torch.tensor([[5.0, 1.0, 2.0, 3.0]])
    valid = torch.tensor([[False, True, True, True]])
    torch.testing.assert_close(normalise_scores(scores, valid, "minmax"), torch.tensor([[0.0, 0.0, 0.5, 1.0]]))
    torch.testing.assert_close(normalise_scores(scores, valid, "max"), torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]]))
    with pytest.raises(ValueError, match="normalisation"):
        normalise_scores(scores, valid, "zscore")


def test_masked_quantiles_use_only_valid_entries():
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    torch.testing.assert_close(masked_quantiles(values, valid, (0.0, 0.5, 1.0)), torch.tensor([[1.0, 3.0, 5.0]]))


def test_straight_through_mask_is_sharp_forward_and_has_gradient():
    scores = torch.tensor([[0.2, 0.6, 0.9]])
    theta = torch.tensor([0.5], requires_grad=True)
    plain = soft_keep(scores, theta, 1e6)
    plain.sum().backward()
    assert float(theta.grad.abs()) == 0.0  # at T = 1e6 the sigmoid is flat almost everywhere
    theta.grad = None
    ste = soft_keep(scores, theta, 1e6, ste_temperature=10.0)
    torch.testing.assert_close(ste, torch.tensor([[0.0, 1.0, 1.0]]))
    ste.sum().backward()
    assert float(theta.grad.abs()) > 0


def test_hard_and_top_k_keep():
    redundancy = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.0]])
    spatial = torch.tensor([[0.99, 0.0, 0.0, 0.0, 0.0]])
    alive = torch.tensor([[True, True, True, True, False]])
    keep = hard_keep(redundancy, spatial, torch.tensor([0.4]), torch.tensor([0.95]), alive)
    assert keep.tolist() == [[True, True, True, True, False]]
    assert top_k_keep(redundancy, alive, 2).tolist() == [[False, True, True, False, False]]  # tie: earlier wins
    assert top_k_keep(redundancy, alive, 10).tolist() == alive.tolist()


def test_log_bias_is_zero_for_kept_tokens_and_on_the_diagonal():
    keep_value = torch.tensor([[1.0, 1.0, 0.0, 0.5]])
    is_vision = torch.tensor([[False, True, True, True]])
    bias = attention_log_bias(keep_value, is_vision, 1e-6, torch.float32)[0, 0]
    assert (bias[:, :2] == 0).all() and (bias.diagonal() == 0).all()
    assert bias[0, 2] < -13 and math.isclose(float(bias[0, 3]), math.log(0.5 + 1e-6) - math.log(1 + 1e-6), rel_tol=1e-5)


def test_compaction_keeps_order_and_left_pads():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = compaction_index(keep)
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    hidden = torch.arange(8.0).reshape(2, 4, 1)
    assert gather_positions(hidden, index)[..., 0].tolist() == [[0.0, 2.0, 3.0], [4.0, 4.0, 5.0]]


def test_gather_positions_matches_torch_gather_on_expanded_batches():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 5)
    cos = torch.randn(1, 7, 4).expand(3, -1, -1)  # batch-expanded, as the rotary tables are
    index = torch.tensor([[0, 2, 6], [1, 1, 3], [4, 5, 6]])
    flat = flat_positions(index, 7)
    assert flat.tolist() == [0, 2, 6, 8, 8, 10, 18, 19, 20]
    for tensor in (hidden, cos, torch.arange(7).expand(3, -1)):
        expected = torch.gather(tensor, 1, index.reshape(3, 3, *[1] * (tensor.dim() - 2)).expand(
            3, 3, *tensor.shape[2:]))
        assert torch.equal(gather_positions(tensor, index), expected)
        assert torch.equal(gather_positions(tensor, index, flat), expected)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causal_mask_corner_equals_a_mask_built_for_the_shorter_sequence(impl):
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    config._attn_implementation = impl

    def build(length):
        embeds = torch.zeros(2, length, 8)
        return create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=torch.ones(2, length).long(),
                                  cache=None, position_ids=torch.arange(length)[None])

    ok, corner = causal_mask_corner(build(9), 4)
    expected = build(4)
    assert ok
    assert (corner is None and expected is None) or torch.equal(corner, expected)
    assert causal_mask_corner(object(), 4) == (False, None)


def test_budget_terms_by_hand():
    # 8 layers, modules after layers 1, 3, 5; 100 tokens -> 50 -> 20 -> 10.
    stage = torch.tensor([[100.0, 50.0, 20.0, 10.0]])
    layers = (1, 3, 5)
    assert per_layer_counts(stage, layers, 8).tolist() == [[100, 100, 50, 50, 20, 20, 10, 10]]
    terms = budget_terms(stage, layers, 8, n_target=30.0, lambda_atp=0.1, lambda_target=0.2)
    l_atp = 0.5 * 2 / 8 + 0.2 * 4 / 8 + 0.1 * 6 / 8
    n_bar = (200 + 100 + 40 + 20) / 8
    torch.testing.assert_close(terms["l_atp"], torch.tensor(l_atp))
    torch.testing.assert_close(terms["l_target"], torch.tensor(abs(n_bar - 30) / 100))
    torch.testing.assert_close(terms["budget_loss"], torch.tensor(0.1 * l_atp + 0.2 * abs(n_bar - 30) / 100))


def test_threshold_network_starts_at_its_initial_thresholds():
    net = ThresholdNetwork(13, 16, init_keep=0.01, init_spatial=0.995)
    theta_r, theta_s = net(torch.randn(5, 13))
    torch.testing.assert_close(theta_r, torch.full((5,), 0.01))
    torch.testing.assert_close(theta_s, torch.full((5,), 0.995))


def test_rope2d_leaves_text_tokens_unchanged():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    position_ids = torch.arange(10)[None]
    grid_index = torch.tensor([[-1, -1, 0, 1, 2, 3, -1, -1, -1, -1]])
    cos, sin = rope2d_cos_sin(inv_freq, 1.0, position_ids, grid_index, 2, torch.tensor([2]), (0.25, 0.375, 0.375),
                              torch.float32)
    freqs = position_ids[..., None].float() * inv_freq
    ref_cos = torch.cat([freqs, freqs], -1).cos()
    text = grid_index[0] < 0
    torch.testing.assert_close(cos[0, text], ref_cos[0, text])
    # Vision token (row 1, col 0) and (row 0, col 1) differ in the row / col sections.
    assert not torch.allclose(cos[0, 3], cos[0, 4])
    assert sin.shape == cos.shape == (1, 10, 16)


def test_real_scale_training_config_builds_the_paper_atp_config():
    from atp_repro.paths import repo_root
    from atp_repro.training_config import load_training_config

    training = load_training_config(repo_root() / "configs" / "llava15_7b_atp.yaml")
    config = ATPConfig(**training.atp_kwargs())
    assert config.module_layers == (4, 14, 24)
    assert (config.n_target, config.lambda_atp, config.lambda_target, config.temperature) == (130, 0.1, 0.2, 1e6)


def test_overhead_clock_sums_its_regions_on_cpu():
    import time

    from atp_repro.atp.clock import OverheadClock

    clock = OverheadClock("cpu")
    assert clock.seconds() == 0.0
    for _ in range(2):
        with clock.region():
            time.sleep(0.01)
    time.sleep(0.05)  # outside any region: not counted
    assert 0.02 <= clock.seconds() < 0.05
