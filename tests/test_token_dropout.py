"""Vision-token dropout of the mini upper bound's training: where it hides keys, and that it is off in eval."""

import pytest
import torch

from atp_repro.atp.tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava
from atp_repro.mini.token_dropout import TokenDropoutConfig, VisionTokenDropout, draw_plan, dropout_bias


def _vision_attention(model, inputs):
    """Per layer, the attention mass text queries put on vision keys: (N,) averaged over batch, heads."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    vision = inputs["input_ids"] == IMAGE_TOKEN_ID  # (B, L)
    text = (~vision) & inputs["attention_mask"].bool()
    first_vision = int(vision[0].nonzero()[0])
    after = torch.zeros_like(text)
    after[:, first_vision:] = True
    queries = text & after  # prompt queries (after the image span)
    mass = []
    for att in out.attentions:  # (B, H, L, L)
        to_vision = (att * vision[:, None, None, :]).sum(-1).mean(1)  # (B, L)
        mass.append(float(to_vision[queries].mean()))
    return out.logits, torch.tensor(mass)


@pytest.fixture()
def model():
    return tiny_llava(num_layers=4, grid=4, attn_implementation="eager")


def test_eval_mode_is_untouched(model):
    inputs = tiny_inputs(model, (3, 5), (6, 4))
    stock, _ = _vision_attention(model, inputs)
    hooks = VisionTokenDropout(model, TokenDropoutConfig(p=1.0, max_keep=0.0), seed=0)
    hooked, _ = _vision_attention(model.eval(), inputs)
    torch.testing.assert_close(hooked, stock, rtol=0, atol=0)
    hooks.remove()


def test_p_zero_in_training_is_untouched(model):
    inputs = tiny_inputs(model, (3, 5), (6, 4))
    model.train()
    stock, _ = _vision_attention(model, inputs)
    VisionTokenDropout(model, TokenDropoutConfig(p=0.0), seed=0)
    hooked, _ = _vision_attention(model, inputs)
    torch.testing.assert_close(hooked, stock, rtol=1e-6, atol=1e-6)


def test_all_hidden_from_the_start_layer_on(model):
    """p=1, keep 0, start at layer 2: text queries see vision keys in layers 0-1 only; left padding holds."""
    inputs = tiny_inputs(model, (3, 5), (6, 4))
    model.train()
    VisionTokenDropout(model, TokenDropoutConfig(p=1.0, min_layer=2, max_keep=0.0), seed=0)
    # min_layer=2 of 4 layers draws the start from {2, 3}; both hide everything in layer 3.
    _, mass = _vision_attention(model, inputs)
    assert mass[0] > 0.05 and mass[1] > 0.05
    assert mass[3] == 0.0
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits[inputs["attention_mask"].bool()]).all()


def test_hooks_can_be_removed(model):
    inputs = tiny_inputs(model)
    model.train()
    stock, _ = _vision_attention(model, inputs)
    hooks = VisionTokenDropout(model, TokenDropoutConfig(p=1.0, max_keep=0.0), seed=0)
    hooks.remove()
    again, _ = _vision_attention(model, inputs)
    torch.testing.assert_close(again, stock, rtol=1e-6, atol=1e-6)


def test_plan_hides_only_vision_tokens_of_dropped_samples():
    g = torch.Generator().manual_seed(0)
    image_mask = torch.zeros(64, 20, dtype=torch.bool)
    image_mask[:, 4:16] = True
    start, hidden = draw_plan(image_mask, 8, TokenDropoutConfig(p=0.5, min_layer=3, max_keep=0.5), g)
    assert not hidden[~image_mask].any()
    dropped = start < 8
    assert 10 < int(dropped.sum()) < 54  # about half of 64
    assert ((start[dropped] >= 3) & (start[dropped] <= 7)).all()
    assert not hidden[~dropped].any()
    kept = 1.0 - hidden[dropped][:, 4:16].float().mean(-1)
    assert float(kept.max()) <= 0.75 and float(kept.mean()) < 0.45  # keep fraction drawn in [0, 0.5]


def test_bias_keeps_the_diagonal_and_causality():
    hidden = torch.tensor([[False, True, True, False]])
    bias = dropout_bias(hidden, torch.tensor([[1, 1, 1, 1]]), torch.float32)[0, 0]
    allowed = bias == 0
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("field,value", [("p", 1.5), ("min_layer", 0), ("max_keep", -0.1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TokenDropoutConfig(**{field: value})


def test_plan_depends_on_the_batch_not_on_history(model):
    """A resumed training sees the same plans: the plan is a function of seed and batch."""
    inputs = tiny_inputs(model, (3, 5), (6, 4))
    model.train()
    VisionTokenDropout(model, TokenDropoutConfig(p=1.0, max_keep=0.3), seed=3)
    with torch.no_grad():
        first = model(**inputs).logits
        model(**tiny_inputs(model, (2,), (5,), seed=1))  # another batch in between
        again = model(**inputs).logits
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_world_option_enters_the_upper_bound_key_only_when_set():
    from atp_repro.mini import runs

    world = runs.MiniWorldConfig()
    plain = runs.upper_bound_spec(world)
    assert "ub_token_dropout" not in plain
    dropped = runs.upper_bound_spec(world.replace(ub_token_dropout=TokenDropoutConfig(p=0.75, max_keep=0.25)))
    assert dropped["ub_token_dropout"] == {"p": 0.75, "min_layer": 1, "max_keep": 0.25}
