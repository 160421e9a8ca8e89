"""The component-ablation switches: which importance forms S_r, which criteria decide.

Each switch is checked against an independent computation on a case built so that the switch
changes the kept set (a switch that silently did nothing would fail).
"""

from __future__ import annotations

import math

import pytest
import torch

from atp_repro import ATPConfig, apply_atp, last_atp_record
from atp_repro.atp.calibration import calibrate_thresholds
from atp_repro.atp.module import ATPModule
from atp_repro.atp.tiny import tiny_inputs, tiny_llava


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def _module(theta_r: float, theta_s: float, **changes) -> ATPModule:
    module = ATPModule(ATPConfig(module_layers=(0,), **changes), 0, hidden_size=8, grid_size=2)
    with torch.no_grad():
        net = module.threshold_net
        for head, theta in ((net.redundancy_head, theta_r), (net.spatial_head, theta_s)):
            head.weight.zero_()
            head.bias.fill_(math.log(theta / (1 - theta)))
    return module


N_VISION, N_PROMPT = 8, 3


def _case(seed: int = 0):
    """[vision x 8][prompt x 3] with random received attention; two grid tokens score 0.9 spatially."""
    g = torch.Generator().manual_seed(seed)
    length = N_VISION + N_PROMPT
    vision_weight = torch.zeros(1, length)
    vision_weight[0, :N_VISION] = 1.0
    column_sums = torch.rand(1, length, 2, generator=g)
    column_sums[0, N_VISION:] = 0.0
    spatial = torch.zeros(1, length)
    spatial[0, [2, 5]] = 0.9
    self_imp = _minmax(column_sums[0, :N_VISION, 0] / torch.arange(N_VISION, 0, -1).float())
    cross_imp = _minmax(column_sums[0, :N_VISION, 1] / N_PROMPT)
    return column_sums, vision_weight, 1.0 - vision_weight, spatial, self_imp, cross_imp


def _kept(module: ATPModule, case, keep_value=None):
    column_sums, vision_weight, prompt_weight, spatial, _, _ = case
    alive = vision_weight.bool()
    decision = module.decide(column_sums, vision_weight, prompt_weight, spatial, alive, alive, N_VISION, keep_value)
    return decision, set(torch.nonzero(decision.keep[0]).flatten().tolist())


@pytest.mark.parametrize("importance", ["both", "self", "cross"])
def test_importance_switch_picks_which_attention_forms_the_redundancy_score(importance):
    case = _case(seed=4)
    self_imp, cross_imp = case[4], case[5]
    expected_score = {"both": 0.5 * (self_imp + cross_imp), "self": self_imp, "cross": cross_imp}[importance]
    decision, kept = _kept(_module(0.5, 0.999, importance=importance), case)
    assert torch.allclose(decision.redundancy[0, :N_VISION], expected_score, atol=1e-6)
    assert kept == set(torch.nonzero(expected_score > 0.5).flatten().tolist())
    # The case separates the three readings: each keeps a different set.
    sets = {name: frozenset(torch.nonzero(s > 0.5).flatten().tolist())
            for name, s in (("both", 0.5 * (self_imp + cross_imp)), ("self", self_imp), ("cross", cross_imp))}
    assert len(set(sets.values())) == 3


@pytest.mark.parametrize("criteria", ["both", "redundancy", "spatial"])
@pytest.mark.parametrize("soft", [False, True])
def test_criteria_switch_picks_which_rules_decide(criteria, soft):
    case = _case(seed=4)
    s_r = 0.5 * (case[4] + case[5])
    by_redundancy = set(torch.nonzero(s_r > 0.5).flatten().tolist())
    by_spatial = {2, 5}
    assert by_redundancy - by_spatial and by_spatial - by_redundancy  # each rule keeps tokens the other does not
    expected = {"both": by_redundancy | by_spatial, "redundancy": by_redundancy, "spatial": by_spatial}[criteria]
    keep_value = torch.ones(1, N_VISION + N_PROMPT) if soft else None
    decision, kept = _kept(_module(0.5, 0.8, criteria=criteria), case, keep_value)
    assert kept == expected
    if soft:  # the soft mask agrees with the hard decision and text keeps D = 1
        assert set(torch.nonzero(decision.keep_value[0, :N_VISION] > 0.5).flatten().tolist()) == expected
        assert decision.keep_value[0, N_VISION:].tolist() == [1.0] * N_PROMPT


@pytest.mark.parametrize("criteria,moves,still", [("redundancy", "redundancy_head", "spatial_head"),
                                                   ("spatial", "spatial_head", "redundancy_head")])
def test_a_switched_off_criterion_gets_no_gradient_and_nothing_is_nan(criteria, moves, still):
    module = _module(0.5, 0.8, criteria=criteria, ste_temperature=3.0)
    case = _case(seed=4)
    keep_value = torch.ones(1, N_VISION + N_PROMPT)
    decision, _ = _kept(module, case, keep_value)
    (decision.keep_surrogate[0, :N_VISION].sum() + decision.keep_value[0, :N_VISION].sum()).backward()
    grads = {name: getattr(module.threshold_net, name).bias.grad for name in ("redundancy_head", "spatial_head")}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert grads[moves] is not None and float(grads[moves].abs().sum()) > 0
    assert grads[still] is None or float(grads[still].abs().sum()) == 0.0


def test_spatial_only_calibration_moves_theta_s_to_the_budget():
    config = ATPConfig(module_layers=(1, 2, 3), criteria="spatial", grid_strides=(2, 3, 4))
    model = apply_atp(tiny_llava(), config)
    inputs = tiny_inputs(model, prefix_lengths=(3, 1, 2, 0), prompt_lengths=(5, 6, 4, 7), seed=1)
    spatial_before = [float(m.threshold_net.spatial_head.bias.detach()) for m in model.model.language_model.atp_modules]
    result = calibrate_thresholds(model, inputs, n_target=30.0)
    spatial_after = [float(m.threshold_net.spatial_head.bias.detach()) for m in model.model.language_model.atp_modules]
    assert spatial_after != spatial_before
    with torch.no_grad():
        model(**inputs)
    counts = last_atp_record(model).stage_counts.float().mean(0)
    assert counts[1] < counts[0]  # the spatial rule alone prunes
    assert result["kept"][0] == pytest.approx(float(counts[1]))


@pytest.mark.parametrize("name,value", [("importance", "text"), ("criteria", "none"), ("criteria", "Both")])
def test_bad_switch_values_are_rejected_naming_the_field(name, value):
    with pytest.raises(ValueError, match=f"ATPConfig.{name}=.*one of"):
        ATPConfig(**{name: value})


def test_fixed_keep_with_spatial_only_is_rejected():
    with pytest.raises(ValueError, match="ATPConfig.criteria"):
        ATPConfig(module_layers=(0,), fixed_keep=(4,), criteria="spatial")
