"""Equivalence and behaviour tests of ATP on transformers' own LlavaForConditionalGeneration."""

from __future__ import annotations

import math

import pytest
import torch

from atp_repro import ATPConfig, apply_atp, atp_parameters, budget_loss, last_atp_record, token_counts
from atp_repro.atp.tiny import IMAGE_TOKEN_ID, single_inputs, tiny_inputs, tiny_llava

LAYERS = (1, 2, 3)


def set_thresholds(model, theta_r: float, theta_s: float = 0.999) -> None:
    """Make every module's threshold network output constants (zero weights, chosen biases)."""
    for module in model.model.language_model.atp_modules:
        net = module.threshold_net
        with torch.no_grad():
            net.redundancy_head.weight.zero_()
            net.spatial_head.weight.zero_()
            net.redundancy_head.bias.fill_(math.log(theta_r / (1 - theta_r)))
            net.spatial_head.bias.fill_(math.log(theta_s / (1 - theta_s)))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_keeping_everything_reproduces_the_stock_model(impl):
    stock = tiny_llava(attn_implementation=impl)
    model = apply_atp(tiny_llava(attn_implementation=impl), ATPConfig(module_layers=LAYERS, fixed_keep=(64, 64, 64)))
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, atol=1e-5, rtol=0)
    expected = stock.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)
    assert token_counts(model).tolist() == [[64] * 6, [64] * 6]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_fixed_keep_counts_and_cached_generation_equals_recomputation(impl):
    model = apply_atp(tiny_llava(attn_implementation=impl), ATPConfig(module_layers=LAYERS, fixed_keep=(32, 16, 8)))
    inputs = tiny_inputs(model)
    with torch.no_grad():
        model(**inputs)
    assert token_counts(model).tolist() == [[64, 64, 32, 16, 8, 8]]
    with_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    without_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_pruning_every_vision_token_still_runs(impl):
    # A learned threshold can exceed every score (e.g. a high threshold in a short fine-tune): the
    # later modules then see no vision token at all and must pass the text through unchanged.
    model = apply_atp(tiny_llava(attn_implementation=impl), ATPConfig(module_layers=LAYERS, fixed_keep=(4, 0, 0)))
    inputs = tiny_inputs(model, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    with torch.no_grad():
        model(**inputs)
    assert token_counts(model).tolist() == [[64, 64, 4, 0, 0, 0]] * 2
    with_cache = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(with_cache, model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False))
    learned = apply_atp(tiny_llava(attn_implementation=impl), ATPConfig(module_layers=LAYERS, temperature=20.0))
    set_thresholds(learned, theta_r=0.9999, theta_s=0.9999)  # thresholds above every score: nothing survives
    with torch.no_grad():
        learned(**inputs)  # hard path (eval)
    assert token_counts(learned)[:, 2:].sum() == 0
    labels = torch.where(inputs["input_ids"] == IMAGE_TOKEN_ID, -100, inputs["input_ids"])
    out = learned.train()(**inputs, labels=labels)  # soft path (train)
    (out.loss + budget_loss(learned)).backward()
    assert torch.isfinite(out.loss)


def test_kv_cache_shrinks_after_each_module():
    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, fixed_keep=(32, 16, 8)))
    inputs = tiny_inputs(model)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    text = inputs["input_ids"].shape[1] - 64
    lengths = [out.past_key_values.get_seq_length(i) for i in range(6)]
    assert lengths == [64 + text, 64 + text, 32 + text, 16 + text, 8 + text, 8 + text]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_batch_equals_single_runs_with_different_counts(impl):
    model = apply_atp(tiny_llava(attn_implementation=impl, seed=1), ATPConfig(module_layers=LAYERS))
    set_thresholds(model, theta_r=0.45)
    batch = tiny_inputs(model, prefix_lengths=(2, 4, 3), prompt_lengths=(7, 3, 5), seed=3)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    batch_counts = token_counts(model)
    assert len(set(batch_counts[:, -1].tolist())) > 1, "thresholds should keep different counts per sample"
    for i in range(3):
        single = single_inputs(batch, i)
        out = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[0, -6:], generated[i, -6:]), f"sample {i} differs"
        assert torch.equal(token_counts(model)[0], batch_counts[i])


@pytest.mark.parametrize("ste, impl", [(True, "eager"), (False, "eager"), (True, "sdpa")])
def test_soft_path_gradients_reach_thresholds_and_language_model(ste, impl):
    config = ATPConfig(module_layers=LAYERS, temperature=1e6 if ste else 20.0, ste_temperature=10.0 if ste else None,
                       n_target=20)
    model = apply_atp(tiny_llava(attn_implementation=impl), config).train()
    set_thresholds(model, theta_r=0.3, theta_s=0.9)
    inputs = tiny_inputs(model, prefix_lengths=(3, 4), prompt_lengths=(6, 4))
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    out = model(**inputs, labels=labels)
    # The language-modelling loss alone reaches the thresholds through the attention log-masks ...
    out.loss.backward(retain_graph=True)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in atp_parameters(model))
    # ... and so does the budget term.
    model.zero_grad()
    (out.loss + budget_loss(model)).backward()
    threshold_grads = [p.grad for p in atp_parameters(model) if p.grad is not None]
    assert threshold_grads and any(float(g.abs().sum()) > 0 for g in threshold_grads)
    lm_grad = model.model.language_model.layers[0].mlp.up_proj.weight.grad
    assert lm_grad is not None and float(lm_grad.abs().sum()) > 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_soft_path_at_large_temperature_keeps_the_hard_set(impl):
    model = apply_atp(tiny_llava(attn_implementation=impl, seed=2), ATPConfig(module_layers=LAYERS, temperature=1e6))
    set_thresholds(model, theta_r=0.4, theta_s=0.95)
    inputs = tiny_inputs(model, prefix_lengths=(3, 5), prompt_lengths=(6, 3), seed=5)
    with torch.no_grad():
        model.eval()
        model(**inputs)
        hard = last_atp_record(model)
        model.train()
        model(**inputs)
        soft = last_atp_record(model)
    assert soft.soft and not hard.soft
    for m in range(len(LAYERS)):
        for b in range(2):
            assert torch.equal(soft.kept_vision_indices[m][b], hard.kept_vision_indices[m][b]), (m, b)
    assert torch.equal(soft.token_counts, hard.token_counts)
    assert 0 < hard.token_counts[:, -1].min() < 64


def test_scores_equal_a_direct_computation_from_output_attentions():
    stock = tiny_llava(attn_implementation="eager")
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2), seed=4)
    with torch.no_grad():
        attentions = stock(**inputs, output_attentions=True).attentions
    for backend in ("eager", "fast"):
        model = apply_atp(tiny_llava(attn_implementation="sdpa"),
                          ATPConfig(module_layers=(1, 3, 4), fixed_keep=(64, 64, 64), scoring_backend=backend))
        with torch.no_grad():
            model(**inputs)
        record = last_atp_record(model)
        for m, layer in enumerate((1, 3, 4)):
            probs = attentions[layer].mean(1)  # (B, L, L), head average
            for b in range(2):
                ids = inputs["input_ids"][b]
                valid = inputs["attention_mask"][b].bool()
                vision = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
                prompt = ((torch.arange(len(ids)) > vision.max()) & valid).nonzero().flatten()
                self_direct = torch.stack([probs[b, vision[vision >= k], k].mean() for k in vision])
                cross_direct = probs[b][prompt][:, vision].mean(0)
                # Nothing is pruned (fixed_keep = all), so positions are the input's.
                assert torch.equal(record.vision_positions[m][b][vision], torch.arange(64))
                torch.testing.assert_close(record.self_importance[m][b][vision], self_direct, atol=1e-6, rtol=1e-4)
                torch.testing.assert_close(record.cross_importance[m][b][vision], cross_direct, atol=1e-6, rtol=1e-4)
                expected = 0.5 * (_minmax(self_direct) + _minmax(cross_direct))
                got = record.redundancy[m][b][vision]
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("encoding", ["rope2d", "learned2d"])
def test_pruning_position_encodings_generate_consistently_and_learn(encoding):
    config = ATPConfig(module_layers=LAYERS, fixed_keep=(32, 16, 8), position_encoding=encoding)
    model = apply_atp(tiny_llava(), config)
    inputs = tiny_inputs(model, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    with_cache = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(with_cache, model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False))
    if encoding == "learned2d":
        model.train()
        labels = inputs["input_ids"].clone()
        labels[:, :-3] = -100
        model(**inputs, labels=labels).loss.backward()
        embedding = model.model.language_model.atp_modules[0].grid_embedding
        assert float(embedding.row.weight.grad.abs().sum()) > 0


def test_save_and_load_round_trip(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from atp_repro import load_atp_pretrained, save_atp_pretrained

    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, position_encoding="learned2d"))
    with torch.no_grad():
        for parameter in atp_parameters(model):
            parameter.add_(0.01 * torch.randn_like(parameter))
    save_atp_pretrained(model, tmp_path)
    # The LLaVA checkpoint is the stock one: a stock load finds exactly its own keys, nothing unexpected.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert not any("atp_modules" in k for k in saved)
    stock_keys = set(tiny_llava().state_dict())
    assert {k for k in model.state_dict() if "atp_modules" not in k} == stock_keys
    stock = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)[1]
    assert not stock["unexpected_keys"] and not stock["missing_keys"]
    loaded = load_atp_pretrained(tmp_path, LlavaForConditionalGeneration).eval()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="module_layers"):
        apply_atp(tiny_llava(num_layers=4), ATPConfig(module_layers=(1, 2, 5)))
    with pytest.raises(ValueError, match="fixed_keep"):
        ATPConfig(module_layers=LAYERS, fixed_keep=(8, 4))
    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS))
    inputs = tiny_inputs(model, prefix_lengths=(3, 3), prompt_lengths=(6, 6))
    flash = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS)).train()
    flash.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="additive float masks"):
        flash(**inputs, atp_answer_mask=torch.zeros_like(inputs["input_ids"], dtype=torch.bool))


@pytest.mark.parametrize("field, value", [
    ("n_target", float("inf")), ("n_target", float("nan")), ("lambda_atp", float("inf")),
    ("lambda_target", float("nan")), ("module_layers", (True, 2, 3)), ("fixed_keep", (8, 16, 4)),
    ("fixed_keep", (8, True, 0)),
])
def test_config_rejects_non_finite_boolean_and_increasing_values(field, value):
    with pytest.raises(ValueError, match=field):
        ATPConfig(**{"module_layers": LAYERS, field: value})


def test_fixed_keep_larger_than_the_grid_is_rejected_at_apply_time():
    with pytest.raises(ValueError, match=r"fixed_keep=\(99, 64, 64\) keeps more than the model's 64"):
        apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, fixed_keep=(99, 64, 64)))


def test_a_truncated_weights_file_names_itself_and_leaves_the_model_stock(tmp_path):
    from atp_repro import has_atp, load_atp, save_atp

    save_atp(apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS)), tmp_path)
    weights = tmp_path / "atp_modules.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"atp_modules\.pt: cannot load .* left unchanged"):
        load_atp(model, tmp_path)
    assert not has_atp(model)
    save_atp(apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS)), tmp_path)  # repaired: a retry works
    assert has_atp(load_atp(model, tmp_path))
    (tmp_path / "atp_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="atp_config.json"):
        load_atp(tiny_llava(), tmp_path)


def test_has_atp():
    from atp_repro import has_atp

    model = tiny_llava()
    assert not has_atp(model)
    assert has_atp(apply_atp(model, ATPConfig(module_layers=LAYERS)))
    with pytest.raises(ValueError, match="apply_atp"):
        token_counts(tiny_llava())
