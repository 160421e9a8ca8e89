"""The gradient estimator the real-scale config ships, and budget-calibrated initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from atp_repro import ATPConfig, apply_atp, atp_parameters, budget_loss, proportional_module_layers
from atp_repro.atp.calibration import calibrate_thresholds, mean_tokens, stage_targets, uniform_keep_ratio
from atp_repro.atp.tiny import tiny_inputs, tiny_llava
from atp_repro.training_config import REAL_CONFIG, load_training_config

NUM_LAYERS, GRID = 8, 8


def real_atp_config(**changes) -> ATPConfig:
    """The real-scale config's ATP section on an 8-layer, 8x8 tiny model (same depth fractions)."""
    kwargs = load_training_config(REAL_CONFIG).atp_kwargs()
    kwargs["module_layers"] = proportional_module_layers(NUM_LAYERS)
    kwargs["grid_strides"] = tuple(s for s in kwargs["grid_strides"] if s <= GRID)
    kwargs["n_target"] = 10.0  # of 64: the budget pulls the counts down
    kwargs.update(changes)
    return ATPConfig(**kwargs)


def thresholds_after_steps(config: ATPConfig, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Biases of every module's two heads before and after ``steps`` AdamW steps at the real ATP lr."""
    torch.manual_seed(0)
    model = apply_atp(tiny_llava(num_layers=NUM_LAYERS, grid=GRID), config).train()
    inputs = tiny_inputs(model, prefix_lengths=(3, 4), prompt_lengths=(6, 5))
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    heads = [(m.threshold_net.redundancy_head.bias, m.threshold_net.spatial_head.bias)
             for m in model.model.language_model.atp_modules]
    before = torch.tensor([[r.item(), s.item()] for r, s in heads])
    lr = load_training_config(REAL_CONFIG).training.lr_atp
    opt = torch.optim.AdamW(atp_parameters(model), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss + budget_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = torch.tensor([[r.item(), s.item()] for r, s in heads])
    return before, after


def test_real_config_estimator_moves_both_thresholds_of_every_module():
    before, after = thresholds_after_steps(real_atp_config())
    moved = after - before
    assert (moved != 0).all(), f"some threshold did not move: {moved}"
    # Above the budget, the loss asks for fewer tokens: theta_r (and theta_s) rise.
    assert (moved[:, 0] > 0).all(), moved


def test_the_papers_plain_sigmoid_gives_the_thresholds_no_gradient():
    # The reason the real config does not ship the paper's plain estimator (this test fails if it moved).
    before, after = thresholds_after_steps(real_atp_config(ste_temperature=None, score_gradient=False))
    assert torch.equal(before, after)


def test_uniform_keep_ratio_solves_the_layer_average():
    layers = (0, 3, 5)
    r = uniform_keep_ratio(32.5, 144, layers, 8)
    assert mean_tokens(r, 144, layers, 8) == pytest.approx(32.5, abs=1e-6)
    assert stage_targets(32.5, 144, layers, 8)[0] == pytest.approx(144 * r)
    # A smaller budget needs a smaller ratio; the first layer's full 144 tokens bound it from below.
    assert uniform_keep_ratio(20.0, 144, layers, 8) < r
    # The 88-token budget of the mini world: later stages are floored at one token per sample.
    small = stage_targets(19.85, 144, layers, 8)
    assert small[0] < 6 and small[1:] == [1.0, 1.0]
    assert mean_tokens(uniform_keep_ratio(19.85, 144, layers, 8), 144, layers, 8) == pytest.approx(19.85)
    with pytest.raises(ValueError, match="n_target=18 is unreachable"):
        uniform_keep_ratio(18.0, 144, layers, 8)  # 144 / 8 + 7 / 8 = 18.875 at the least


@pytest.mark.parametrize("n_target", [14.0, 24.0])
def test_calibration_starts_at_the_budget(n_target):
    config = real_atp_config(n_target=n_target)
    model = apply_atp(tiny_llava(num_layers=NUM_LAYERS, grid=GRID), config)
    inputs = tiny_inputs(model, prefix_lengths=(3, 4, 2, 5), prompt_lengths=(6, 5, 7, 4), seed=1)
    report = calibrate_thresholds(model, inputs)
    targets = stage_targets(n_target, GRID * GRID, config.module_layers, NUM_LAYERS)
    assert report["target"] == pytest.approx(targets)
    # Each stage's batch-mean count is within one token of its target, so N_bar is near n_target.
    assert report["kept"] == pytest.approx(targets, abs=1.0)
    assert not model.training  # the mode it was given is restored
    with torch.no_grad():
        model.eval()
        model(**inputs)
    from atp_repro import token_counts

    assert float(token_counts(model).float().mean()) == pytest.approx(n_target, abs=1.5)


def test_attention_bias_differentiates_the_smooth_keep_value_not_the_pruned_one():
    # Key 0 is pruned (S_r 0.2 < theta_r 0.5), key 1 kept. The bias keeps its forward value log(D + eps);
    # its gradient is that of log(S + eps), S the smooth union, so a pruned token does not pass its loss
    # gradient on multiplied by 1 / (0 + eps).
    from atp_repro.atp.masks import attention_log_bias, keep_mask

    eps = 1e-6
    theta_r = torch.tensor([0.5], requires_grad=True)
    theta_s = torch.tensor([0.99])
    redundancy, spatial = torch.tensor([[0.2, 0.8]]), torch.zeros(1, 2)
    mask, surrogate = keep_mask(redundancy, spatial, theta_r, theta_s, 1e6, ste_temperature=3.0)
    assert mask.tolist() == [[0.0, 1.0]]
    bias = attention_log_bias(mask, torch.ones(1, 2, dtype=torch.bool), eps, torch.float32, surrogate)
    assert float(bias[0, 0, 1, 0]) == pytest.approx(math.log(eps) - math.log1p(eps))
    (grad,) = torch.autograd.grad(bias[0, 0, 1, 0], theta_r, retain_graph=True)
    smooth_r = torch.sigmoid(3.0 * (0.2 - theta_r.detach()))
    smooth_s = torch.sigmoid(torch.tensor(3.0 * (0.0 - 0.99)))
    smooth = 1 - (1 - smooth_r) * (1 - smooth_s)
    d_smooth = -3.0 * smooth_r * (1 - smooth_r) * (1 - smooth_s)  # d smooth / d theta_r
    assert float(grad) == pytest.approx(float(d_smooth / (smooth + eps)), rel=1e-4)
    # Without the surrogate the same gradient is about 1 / eps times larger.
    plain = attention_log_bias(mask, torch.ones(1, 2, dtype=torch.bool), eps, torch.float32)
    (grad_plain,) = torch.autograd.grad(plain[0, 0, 1, 0], theta_r)
    assert abs(float(grad_plain)) > 1e4 * abs(float(grad))


def budget_backward(config: ATPConfig) -> torch.nn.Module:
    """The ATP language model of a tiny LLaVA after one backward pass of the budget loss alone."""
    model = apply_atp(tiny_llava(num_layers=NUM_LAYERS, grid=GRID, attn_implementation="sdpa"), config).train()
    inputs = tiny_inputs(model, prefix_lengths=(3, 4), prompt_lengths=(6, 5))
    model(**inputs, atp_answer_mask=torch.zeros_like(inputs["input_ids"], dtype=torch.bool))
    budget_loss(model).backward()
    return model.model.language_model


def test_budget_gradient_reaches_the_thresholds_not_the_scores():
    lm = budget_backward(real_atp_config(score_gradient=False))
    assert float(lm.atp_modules[0].threshold_net.redundancy_head.bias.grad.abs()) > 0
    # The language model cannot lower the budget by reshaping its attention scores.
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in lm.layers.parameters())


def test_score_gradient_lets_the_budget_reach_the_attention_that_scores():
    # The option's opposite of the test above: the surrogate now differentiates the redundancy scores too,
    # so the budget's gradient reaches the query and key projections of the layers that produce them.
    lm = budget_backward(real_atp_config(score_gradient=True))
    scoring = lm.layers[proportional_module_layers(NUM_LAYERS)[0]]  # the first module scores with its attention
    assert float(scoring.self_attn.q_proj.weight.grad.abs().sum()) > 0
    assert float(scoring.self_attn.k_proj.weight.grad.abs().sum()) > 0


def test_score_gradient_is_the_same_with_the_fast_kernel_as_with_eager_attention():
    # The fused kernel's log-sum-exp is a constant to autograd; the fast path must not use it when the scores
    # carry gradient, or it would differentiate exp(logit - const) instead of the softmax.
    grads = {}
    for backend in ("eager", "fast"):
        lm = budget_backward(real_atp_config(score_gradient=True, scoring_backend=backend))
        layer = lm.layers[proportional_module_layers(NUM_LAYERS)[0]]
        grads[backend] = (layer.self_attn.q_proj.weight.grad.clone(), layer.self_attn.k_proj.weight.grad.clone())
    for fast, eager in zip(grads["fast"], grads["eager"]):
        assert float(eager.abs().max()) > 0
        torch.testing.assert_close(fast, eager, rtol=1e-3, atol=1e-4 * float(eager.abs().max()))


def test_score_gradient_needs_the_straight_through_surrogate():
    with pytest.raises(ValueError, match="score_gradient"):
        ATPConfig(score_gradient=True)  # ste_temperature None: nothing would carry the gradient
    with pytest.raises(ValueError, match="score_gradient"):
        ATPConfig(ste_temperature=3.0, score_gradient="yes")


@pytest.mark.parametrize("criteria", ["both", "spatial"])
def test_calibration_replays_each_modules_decision_instead_of_running_the_model(criteria):
    # Calibration runs one forward per module (plus one for N_0) and bisects on the recorded inputs of
    # the module's decide; the counts it reaches are those a full forward at the calibrated thresholds gives.
    from atp_repro.atp.api import last_atp_record
    from atp_repro.atp.calibration import _stage_mean_of

    config = real_atp_config(n_target=20.0, criteria=criteria)
    model = apply_atp(tiny_llava(num_layers=NUM_LAYERS, grid=GRID), config).eval()
    inputs = tiny_inputs(model, prefix_lengths=(3, 4, 2, 5), prompt_lengths=(6, 5, 7, 4), seed=2)
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    report = calibrate_thresholds(model, inputs)
    handle.remove()
    assert len(forwards) == len(config.module_layers) + 1
    with torch.no_grad():
        model(**inputs)
    counts = last_atp_record(model).stage_counts.float().mean(0)
    assert report["kept"] == [float(c) for c in counts[1:]]
    # At other thresholds too, the replayed decision counts what the forward counts.
    module = model.model.language_model.atp_modules[1]
    head = module.threshold_net.spatial_head if criteria == "spatial" else module.threshold_net.redundancy_head
    with torch.no_grad():
        replay = _stage_mean_of(model, inputs, module)
        assert "decide" not in vars(module)  # the method is restored
        seen = set()
        for bias in (-6.0, -1.0, 0.0, 1.5):
            head.bias.fill_(bias)
            model(**inputs)
            seen.add(replay())
            assert replay() == float(last_atp_record(model).stage_counts[:, 2].float().mean())
    assert len(seen) > 1  # the thresholds tried change the count
