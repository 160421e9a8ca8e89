"""Drop-in behaviour: where pruning has nothing to do, an ATP model behaves like the stock LLaVA.

Each case runs a tiny stock ``LlavaForConditionalGeneration`` and the same weights with ATP keeping
every token, and compares outputs exactly (or checks the documented error).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from atp_repro import ATPConfig, apply_atp, last_atp_record
from atp_repro.atp.tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava

LAYERS = (1, 2, 3)
KEEP_ALL = ATPConfig(module_layers=LAYERS, fixed_keep=(64, 64, 64))


def _pair(impl: str = "sdpa"):
    return tiny_llava(attn_implementation=impl), apply_atp(tiny_llava(attn_implementation=impl), KEEP_ALL)


def _greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)


class ForceToken(LogitsProcessor):
    """Makes ``token`` the greedy choice at generation step ``step`` (0-based)."""

    def __init__(self, prompt_length: int, step: int, token: int) -> None:
        self.at, self.token = prompt_length + step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = scores.clone()
            scores[:, self.token] = scores.max() + 10.0
        return scores


def test_a_generated_image_token_id_is_text_as_in_the_stock_model():
    stock, atp = _pair()
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    force = LogitsProcessorList([ForceToken(inputs["input_ids"].shape[1], 2, IMAGE_TOKEN_ID)])
    expected = _greedy(stock, inputs, logits_processor=force)
    assert bool((expected[:, inputs["input_ids"].shape[1] + 2] == IMAGE_TOKEN_ID).all())  # the case happens
    assert torch.equal(_greedy(atp, inputs, logits_processor=force), expected)
    # Without a KV cache the stock model itself fails on it (it re-reads the id as an image token);
    # ATP fails the same way, with transformers' own message.
    for model in (stock, atp):
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            _greedy(model, inputs, logits_processor=force, use_cache=False)


def test_inputs_embeds_without_input_ids_forward_and_generate():
    stock, atp = _pair()
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    embeds = stock.get_input_embeddings()(inputs["input_ids"])
    by_embeds = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"],
                 "pixel_values": inputs["pixel_values"]}
    with torch.no_grad():
        torch.testing.assert_close(atp(**by_embeds).logits, stock(**by_embeds).logits, atol=1e-5, rtol=0)
    assert last_atp_record(atp).token_counts.tolist() == [[64] * 6] * 2  # the image span was found
    assert torch.equal(_greedy(atp, by_embeds), _greedy(stock, by_embeds))


def test_text_only_prompts_run_as_in_the_stock_model():
    stock, atp = _pair()
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    text = {"input_ids": inputs["input_ids"].clone(), "attention_mask": inputs["attention_mask"]}
    text["input_ids"][text["input_ids"] == IMAGE_TOKEN_ID] = 9  # no image at all
    with torch.no_grad():
        torch.testing.assert_close(atp(**text).logits, stock(**text).logits, atol=1e-5, rtol=0)
    for use_cache in (True, False):
        assert torch.equal(_greedy(atp, text, use_cache=use_cache), _greedy(stock, text, use_cache=use_cache))
    with pytest.raises(ValueError, match="no forward with images"):
        last_atp_record(atp)  # nothing was pruned, so there is no record of a pass with images


def test_a_text_only_input_after_an_image_pass_prunes_again_at_the_next_image():
    _, atp = _pair()
    inputs = tiny_inputs(atp, prefix_lengths=(3,), prompt_lengths=(6,))
    with torch.no_grad():
        atp(input_ids=torch.randint(5, 100, (1, 12)))
        atp(**inputs)
    assert last_atp_record(atp).token_counts.tolist() == [[64] * 6]


def test_a_cache_filled_elsewhere_is_refused():
    stock, atp = _pair()
    inputs = tiny_inputs(stock, prefix_lengths=(3,), prompt_lengths=(6,))
    with torch.no_grad():
        cache = stock(**inputs, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="continues only a cache it filled"):
            atp(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True)


def _mixed(inputs: dict) -> dict:
    """Sample 0 keeps its image, sample 1 becomes text-only (one image's pixel values)."""
    mixed = dict(inputs)
    mixed["input_ids"] = inputs["input_ids"].clone()
    mixed["input_ids"][1][mixed["input_ids"][1] == IMAGE_TOKEN_ID] = 9
    mixed["pixel_values"] = inputs["pixel_values"][:1]
    return mixed


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_batch_mixing_image_and_text_only_samples(impl):
    stock, atp = _pair(impl)
    mixed = _mixed(tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2)))
    with torch.no_grad():
        torch.testing.assert_close(atp(**mixed).logits, stock(**mixed).logits, atol=1e-5, rtol=0)
    assert last_atp_record(atp).token_counts.tolist() == [[64] * 6, [0] * 6]
    assert torch.equal(_greedy(atp, mixed), _greedy(stock, mixed))
    # Under pruning, the mixed batch equals its two samples run alone.
    pruned = apply_atp(tiny_llava(attn_implementation=impl), ATPConfig(module_layers=LAYERS, fixed_keep=(16, 8, 4)))
    single = [{k: v[i:i + 1] for k, v in mixed.items() if k != "pixel_values"} for i in (0, 1)]
    single[0]["pixel_values"] = mixed["pixel_values"]
    with torch.no_grad():
        batch = pruned(**mixed).logits
        assert last_atp_record(pruned).token_counts.tolist() == [[64, 64, 16, 8, 4, 4], [0] * 6]
        for i in (0, 1):
            valid = mixed["attention_mask"][i].bool()
            alone = pruned(**single[i]).logits[0]
            torch.testing.assert_close(batch[i][valid], alone[-int(valid.sum()):], atol=1e-5, rtol=0)


def test_the_budget_loss_ignores_text_only_samples():
    from atp_repro.atp.loss import budget_terms

    counts = torch.tensor([[64.0, 16.0, 8.0, 4.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    terms = budget_terms(counts, LAYERS, 6, 20.0, 0.1, 0.2)
    alone = budget_terms(counts[:1], LAYERS, 6, 20.0, 0.1, 0.2)
    assert torch.isfinite(terms["budget_loss"]) and float(terms["budget_loss"]) == float(alone["budget_loss"])
    none = budget_terms(counts[1:], LAYERS, 6, 20.0, 0.1, 0.2)["budget_loss"]
    assert float(none) == 0.0


def test_remaining_limitations_fail_with_a_message_naming_the_alternative():
    from transformers import StaticCache

    _, atp = _pair()
    inputs = tiny_inputs(atp, prefix_lengths=(3,), prompt_lengths=(6,))
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        custom = {**inputs, "attention_mask": torch.ones(1, 1, length, length)}
        with pytest.raises(ValueError, match="2-D .* padding attention_mask"):
            atp(**custom)
        static = StaticCache(config=atp.config.text_config, max_cache_len=length + 8)
        with pytest.raises(TypeError, match="needs a DynamicCache"):
            atp(**inputs, cache=static, use_cache=True)
        # Two image spans in one sample (the model's own feature count is right, ATP's layout is not).
        split = inputs["input_ids"].clone()
        first = int(torch.nonzero(split[0] == IMAGE_TOKEN_ID)[0])
        split[0, first + 10] = 9
        split = torch.cat([split, torch.tensor([[IMAGE_TOKEN_ID]])], dim=1)
        two_spans = {"input_ids": split, "attention_mask": torch.ones_like(split),
                     "pixel_values": inputs["pixel_values"]}
        with pytest.raises(ValueError, match="one contiguous image token span per sample"):
            atp(**two_spans)


def test_a_deep_copy_before_any_forward_matches_the_original():
    import copy

    stock, atp = _pair()
    twin = copy.deepcopy(atp)
    inputs = tiny_inputs(stock, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    expected = _greedy(stock, inputs)
    assert torch.equal(_greedy(twin, inputs), expected) and torch.equal(_greedy(atp, inputs), expected)
    assert twin.generate.model is twin and atp.generate.model is atp


def test_torch_compile_with_graph_breaks_and_compiled_decoder_layers_match_eager():
    """ATP's pruning decisions are data-dependent, so dynamo breaks the graph around them: compiling the
    whole model (default, graph breaks allowed) or only its decoder layers gives the eager outputs."""
    config = ATPConfig(module_layers=LAYERS, fixed_keep=(32, 16, 8))
    eager = apply_atp(tiny_llava(), config)
    inputs = tiny_inputs(eager, prefix_lengths=(3, 5), prompt_lengths=(6, 2))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = eager(**inputs).logits
        whole = torch.compile(eager, backend="eager")(**inputs).logits
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    layered = apply_atp(tiny_llava(), config)
    for layer in layered.model.language_model.layers:
        layer.compile(backend="eager", dynamic=True)  # sequence lengths change at every pruning layer
    with torch.no_grad():
        torch.testing.assert_close(layered(**inputs).logits, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(_greedy(layered, inputs), _greedy(eager, inputs))
    torch._dynamo.reset()


def test_fullgraph_compile_is_a_documented_limitation():
    """One graph cannot hold a per-sample, data-dependent number of kept tokens: fullgraph=True (and
    torch.export) fail in dynamo on ATP's data-dependent branch; compile the decoder layers instead."""
    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, fixed_keep=(32, 16, 8)))
    inputs = tiny_inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        model(**inputs)  # transformers installs its output-capture hooks on the first call (not traceable)
    with torch.no_grad(), pytest.raises(Exception, match="data-dependent"):
        torch.compile(model, backend="eager", fullgraph=True)(**inputs)
    torch._dynamo.reset()


def test_an_unsupported_model_class_is_refused_at_apply_time_naming_it():
    """LLaVA-NeXT's decoder has ``layers`` and ``rotary_emb`` like LLaVA's, but its image spans vary with the
    image's aspect ratio (anyres tiles plus newline tokens): refused before anything changes, not a crash or
    a wrong pruning in forward."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=4),
        text_config=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4),
        image_grid_pinpoints=[[32, 32]], image_token_id=4,
    )
    model = LlavaNextForConditionalGeneration(config)
    lm_class = type(model.model.language_model)
    with pytest.raises(TypeError, match="does not support LlavaNextForConditionalGeneration; supported: Llava"):
        apply_atp(model, ATPConfig(module_layers=(1,)))
    assert type(model.model.language_model) is lm_class and not hasattr(model.model.language_model, "atp_modules")
