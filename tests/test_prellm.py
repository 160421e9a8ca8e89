"""Vision-side token reduction (PruMerge+, VisionZip) on a tiny LLaVA: rules, kept sets recomputed
independently, budgets, keep-all == stock, batch == singles, and the prompt rewriting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atp_repro.atp.tiny import IMAGE_TOKEN_ID, single_inputs, tiny_inputs, tiny_llava
from atp_repro.baselines import apply_baseline, baseline_token_counts
from atp_repro.prellm import rules
from atp_repro.prellm.llava import (
    ReductionConfig,
    apply_reduction,
    prumerge_attention,
    prumerge_divisor_for,
    reduction_counts,
    reduction_for_budget,
)


def _batch(model):
    return tiny_inputs(model, prefix_lengths=(3, 5, 2), prompt_lengths=(6, 4, 7), seed=1)


# ----- rules -------------------------------------------------------------------------------------------

def test_iqr_outliers_hand_case():
    scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 100], [1.0, 1, 1, 1, 1, 1, 1, 1]])
    # row 0: Q1 = 2.75, Q3 = 6.25 (numpy linear), bound 6.25 + 1.5 * 3.5 = 11.5 -> only 100
    assert rules.iqr_outliers(scores).tolist() == [[False] * 7 + [True], [False] * 8]
    q1, q3 = np.percentile(scores[0].numpy(), [25, 75])
    assert (q1, q3) == (2.75, 6.25)


def test_prumerge_plus_indices_order_and_stride():
    n = 64
    attn = torch.full((1, n), 1.0)
    attn[0, [40, 7]] = torch.tensor([50.0, 80.0])  # two outliers: 7 then 40 (most attended first)
    kept = rules.prumerge_plus_indices(attn, stride_divisor=3.0)[0]
    assert kept[:2].tolist() == [7, 40]
    # r = 2/64 -> int(1/r) = 32 -> stride 32/3: floor(0, 10.67, 21.3, ..., < 63) minus the outliers
    uniform = sorted({int(np.floor(x)) for x in np.arange(0, n - 1, 32 / 3)} - {7, 40})
    assert kept[2:].tolist() == uniform
    assert len(rules.prumerge_plus_indices(attn, 6.0)[0]) > len(kept)  # a larger divisor keeps more


def test_prumerge_merge_hand_case():
    features = torch.tensor([[1.0, 0], [0, 1], [2, 0], [0, 3]])
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]])
    attn = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = rules.prumerge_merge(features, keys, attn, torch.tensor([0, 1]), neighbours=1)
    # token 0's most similar other key is token 2 (weight 0.3); token 1's is token 3 (0.4)
    assert torch.allclose(out[0], features[0] + 0.3 * features[2])
    assert torch.allclose(out[1], features[1] + 0.4 * features[3])
    assert torch.allclose(out[2], 0.3 * features[2] + 0.4 * features[3])  # the extra token: pruned ones
    everything = rules.prumerge_merge(features, keys, attn, torch.arange(4), neighbours=1)
    assert everything.shape == (4, 2)  # nothing pruned: no extra token, never more tokens than patches


def test_visionzip_reduce_against_a_loop():
    torch.manual_seed(0)
    b, s, c = 2, 17, 5
    features, keys, attn = torch.randn(b, s, c), torch.randn(b, s, 3), torch.rand(b, s - 1)
    out, keep = rules.visionzip_reduce(features, keys, attn, dominant=5, contextual=3)
    for i in range(b):
        top = sorted((torch.topk(attn[i], 4).indices + 1).tolist())
        assert keep[i].tolist() == [0] + top
        assert torch.equal(out[i, :5], features[i, [0] + top])
        rest = [j for j in range(s) if j not in [0] + top]
        step = max(1, len(rest) // 3)
        targets = rest[::step][:3]
        groups = {t: [t] for t in targets}
        for j in rest:
            if j in targets:
                continue
            sims = [torch.nn.functional.cosine_similarity(keys[i, j], keys[i, t], dim=0) for t in targets]
            groups[targets[int(torch.stack(sims).argmax())]].append(j)
        for k, t in enumerate(targets):
            assert torch.allclose(out[i, 5 + k], features[i, groups[t]].mean(0), atol=1e-6)


# ----- the kept sets, recomputed independently --------------------------------------------------------

def test_prumerge_kept_set_matches_an_independent_recomputation():
    model = tiny_llava()
    batch = _batch(model)
    tower = model.model.vision_tower
    out = tower(batch["pixel_values"], output_hidden_states=True)
    last = tower.encoder.layers[-1]  # PruMerge+ scores with the layer that reads the features (hidden_states[-2])
    h = last.layer_norm1(out.hidden_states[-2])
    q, k = last.self_attn.q_proj(h), last.self_attn.k_proj(h)
    with torch.no_grad():
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)[:, 0, 1:]
    expected = []
    for row in attn.numpy():
        q1, q3 = np.percentile(row, [25, 75])
        outliers = np.where(row > q3 + 1.5 * (q3 - q1))[0]
        expected.append(set(outliers.tolist()))
    assert sum(len(e) for e in expected) > 0  # the case tests something
    reducer_model = apply_reduction(tiny_llava(), ReductionConfig("prumerge+", stride_divisor=3.0, neighbours=4))
    _, kept = reducer_model.model.token_reducer.selection(q, k)
    for e, got in zip(expected, kept):
        assert set(got[: len(e)].tolist()) == e  # outliers first, then the uniform patches
    assert torch.allclose(prumerge_attention(model, batch["pixel_values"]), attn)


def test_visionzip_kept_set_matches_the_towers_attention():
    model = tiny_llava(attn_implementation="eager")
    batch = _batch(model)
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    feature_attn = out.attentions[-2]  # (B, H, S, S) of the feature layer (vision_feature_layer = -2)
    cls = feature_attn.sum(1)[:, 0, 1:]
    dominant, _ = rules.visionzip_split(20)
    expected = [sorted(torch.topk(c, dominant - 1).indices.tolist()) for c in cls]
    reduced = apply_reduction(tiny_llava(), ReductionConfig("visionzip", tokens=20))
    layer = reduced.model.vision_tower.encoder.layers[reduced.model.token_reducer.score_layer]
    h = layer.layer_norm1(out.hidden_states[-3])  # the feature layer's input
    _, kept = reduced.model.token_reducer.selection(layer.self_attn.q_proj(h), layer.self_attn.k_proj(h))
    assert [k.tolist() for k in kept] == expected


# ----- model-level guarantees ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["visionzip", "prumerge+"])
def test_every_token_reproduces_the_stock_model(method):
    stock = tiny_llava()
    batch = _batch(stock)
    model = apply_baseline(tiny_llava(), method, 64, calibration=batch["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**batch, **kw), stock.generate(**batch, **kw))
    assert baseline_token_counts(model).float().mean() == 64


@pytest.mark.parametrize("method, budget", [("visionzip", 20), ("visionzip", 7.4), ("prumerge+", 20.0),
                                            ("prumerge+", 12.5)])
def test_budget_is_met_within_one_token(method, budget):
    model = tiny_llava()
    calib = tiny_inputs(model, prefix_lengths=(2,) * 24, prompt_lengths=(3,) * 24, seed=5)
    model = apply_baseline(model, method, budget, calibration=calib["pixel_values"])
    with torch.no_grad():
        model(**calib)
    assert abs(float(baseline_token_counts(model).float().mean()) - budget) <= 1.0


def test_prumerge_count_adapts_per_image():
    model = tiny_llava()
    calib = tiny_inputs(model, prefix_lengths=(2,) * 24, prompt_lengths=(3,) * 24, seed=5)
    model = apply_baseline(model, "prumerge+", 20.0, calibration=calib["pixel_values"])
    with torch.no_grad():
        model(**calib)
    assert len(set(reduction_counts(model)[:, 0].tolist())) > 1


@pytest.mark.parametrize("config", [ReductionConfig("visionzip", tokens=20),
                                    ReductionConfig("prumerge+", stride_divisor=3.0, neighbours=4)])
def test_batch_equals_singles_and_cache_equals_recompute(config):
    model = apply_reduction(tiny_llava(), config)
    batch = _batch(model)
    kw = dict(max_new_tokens=5, do_sample=False)
    together = model.generate(**batch, **kw)
    counts = reduction_counts(model)[:, 0].tolist()
    new = together[:, batch["input_ids"].shape[1]:]
    for i in range(3):
        alone = model.generate(**single_inputs(batch, i), **kw)
        assert torch.equal(alone[0, -5:], new[i])
        assert reduction_counts(model)[0, 0] == counts[i]
    assert torch.equal(model.generate(**batch, use_cache=False, **kw), together)
    assert together[:, : batch["input_ids"].shape[1]].equal(batch["input_ids"])  # the caller's prompt comes back


@pytest.mark.parametrize("config", [ReductionConfig("visionzip", tokens=20),
                                    ReductionConfig("prumerge+", stride_divisor=3.0, neighbours=4)])
def test_rewritten_prompt_equals_the_stock_model_fed_the_reduced_features(config):
    """The reducer's forward == stock LLaVA given K_i placeholders per sample and the reduced features."""
    model = apply_reduction(tiny_llava(), config)
    stock = tiny_llava()
    batch = _batch(model)
    with torch.no_grad():
        logits = model(**batch).logits
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    counts = [f.shape[0] for f in feats.pooler_output]
    for i in range(3):
        one = single_inputs(batch, i)
        ids = one["input_ids"][0]
        image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
        short = torch.cat([ids[: image[0] + counts[i]], ids[image[-1] + 1:]])[None]
        with torch.no_grad():
            image_features = type(feats)(pooler_output=[feats.pooler_output[i]])
            ref = stock(input_ids=short, mm_encoder_outputs={"image": image_features})
        kept = batch["attention_mask"][i].bool().clone()
        row = batch["input_ids"][i]
        image_rank = torch.cumsum((row == IMAGE_TOKEN_ID).long(), 0)
        kept &= (row != IMAGE_TOKEN_ID) | (image_rank <= counts[i])
        assert torch.allclose(logits[i, kept], ref.logits[0], atol=1e-5)
        assert torch.equal(logits[i, ~kept], torch.zeros_like(logits[i, ~kept]))  # removed placeholders


def test_bad_budgets_and_arguments_are_named():
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"budget must be a number of vision tokens in \[2, 64\]"):
        reduction_for_budget(model, "visionzip", 65)
    with pytest.raises(ValueError, match="calibration: PruMerge\\+ needs calibration images"):
        reduction_for_budget(model, "prumerge+", 20)
    with pytest.raises(ValueError, match="takes no decoder layers"):
        apply_baseline(model, "visionzip", 20, layers=(2,))
    with pytest.raises(ValueError, match="method must be one of"):
        ReductionConfig("tome")
    attn = prumerge_attention(model, _batch(model)["pixel_values"])
    with pytest.raises(ValueError, match="budget must be within what PruMerge\\+ keeps"):
        prumerge_divisor_for(attn, 1.0)
    with pytest.raises(ValueError, match="stride_divisor must be"):
        rules.prumerge_plus_indices(attn, 0.0)


def test_reachable_budget_of_the_vision_side_methods():
    from atp_repro.mini.comparison import reachable_budget

    assert reachable_budget("visionzip", 1.0, 8, 144) == 2.0
    assert reachable_budget("visionzip", 31.8, 8, 144) == 31.8
    assert reachable_budget("prumerge+", 4.8, 8, 144, count_range=(6.5, 140.0)) == 6.5
    assert reachable_budget("prumerge+", 150.0, 8, 144, count_range=(6.5, 140.0)) == 140.0


def test_training_loss_uses_the_rewritten_labels():
    """With labels, the loss is the stock model's loss on the short prompt (the removed placeholders carry
    no labels), and gradients reach the projector."""
    model = apply_reduction(tiny_llava(), ReductionConfig("prumerge+", stride_divisor=3.0, neighbours=4)).train()
    batch = _batch(model)
    # no label on BOS: in a left-padded batch it would be predicted from a padding position
    ids = batch["input_ids"]
    labels = torch.where(batch["attention_mask"].bool() & (ids > 2) & (ids != IMAGE_TOKEN_ID), ids, -100)
    out = model(**batch, labels=labels)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    stock = tiny_llava().train()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        counts = [f.shape[0] for f in feats.pooler_output]
        total, n = 0.0, 0
        for i in range(3):
            one = single_inputs(batch, i)
            ids = one["input_ids"][0]
            image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
            short = torch.cat([ids[: image[0] + counts[i]], ids[image[-1] + 1:]])[None]
            lab = torch.where((short == IMAGE_TOKEN_ID) | (short <= 2), -100, short)
            ref = stock(input_ids=short, labels=lab,
                        mm_encoder_outputs={"image": type(feats)(pooler_output=[feats.pooler_output[i]])})
            k = int((lab[0, 1:] != -100).sum())
            total, n = total + float(ref.loss) * k, n + k
    assert abs(float(out.loss) - total / n) < 1e-5


def test_a_deep_copy_is_an_independent_model():
    import copy

    model = apply_reduction(tiny_llava(), ReductionConfig("visionzip", tokens=20))
    batch = tiny_inputs(model, prefix_lengths=(3,), prompt_lengths=(6,))
    kw = dict(max_new_tokens=4, do_sample=False)
    before = model.generate(**batch, **kw)
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(**batch, **kw), before)
    with torch.no_grad():
        for p in twin.model.multi_modal_projector.parameters():
            p.mul_(-3.0)
    changed = twin.generate(**batch, **kw)
    assert not torch.equal(changed, before)  # the copy runs its own weights ...
    assert torch.equal(model.generate(**batch, **kw), before)  # ... and the original its own


@pytest.mark.parametrize("config", [ReductionConfig("visionzip", tokens=20),
                                    ReductionConfig("prumerge+", stride_divisor=3.0, neighbours=4)])
def test_logits_to_keep_returns_the_last_positions_of_the_callers_layout(config):
    model = apply_reduction(tiny_llava(), config).eval()
    batch = _batch(model)
    with torch.no_grad():
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
    assert last.shape[1] == 1 and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
