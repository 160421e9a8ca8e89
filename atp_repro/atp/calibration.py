"""Threshold initialisation calibrated to the token budget.

A fine-tune that starts with every token kept (theta_r near 0) has to walk its thresholds all the
way down to the budget before it can learn anything at the operating point; a short fine-tune never
gets there, and then runs with different goals end as the same model. Calibration starts the
fine-tune *at* the budget instead: on one batch of training samples it sets each module's theta_r
(the bias of the redundancy head, whose weights are still zero) so that the hard path keeps, on
average over the batch, the stage counts whose layer average is N_target.

How the budget is split between modules (choice): every module keeps the same fraction r of the
tokens alive before it, so stage m holds N_0 r^m tokens, but never fewer than one token per sample
(min-max normalisation gives the most important live token S_r = 1, which no theta_r < 1 prunes).
The spatial threshold keeps its initial value (with ``criteria="spatial"``, where the spatial rule
decides alone, it is theta_s that is calibrated instead). Instance adaptivity is untouched: the threshold is
shared by the batch, but each instance's scores are normalised on their own, so instances keep
different numbers of tokens.

Cost: what module m receives (scores, alive tokens, spatial scores) does not depend on its own
threshold, only on the layers and modules before it. So one forward per module records the inputs
of its ``decide``, and the bisection re-runs only ``decide`` on them: M + 1 forwards in all
instead of one per bisection step, with the same counts bit for bit (the same function of the same
tensors).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .config import ATPConfig


def layers_per_stage(module_layers: tuple[int, ...], num_layers: int) -> list[int]:
    """Decoder layers that see each stage's tokens: before any module, then after each module.

    >>> layers_per_stage((0, 3, 5), 8)
    [1, 3, 2, 2]
    """
    bounds = [0, *(layer + 1 for layer in module_layers), num_layers]
    return [b - a for a, b in zip(bounds, bounds[1:])]


MIN_STAGE_TOKENS = 1.0  # a module keeps at least the most important live token of each sample


def mean_tokens(ratio: float, n0: float, module_layers: tuple[int, ...], num_layers: int,
                floor: float = MIN_STAGE_TOKENS) -> float:
    """N_bar (tokens averaged over all decoder layers) when every module keeps ``ratio`` of its input
    (and at least ``floor`` tokens)."""
    stages = layers_per_stage(module_layers, num_layers)
    counts = [n0] + [max(n0 * ratio**m, floor) for m in range(1, len(stages))]
    return sum(n * c for n, c in zip(stages, counts)) / num_layers


def uniform_keep_ratio(n_target: float, n0: float, module_layers: tuple[int, ...], num_layers: int) -> float:
    """The keep fraction r in [0, 1] per module that gives N_bar = ``n_target`` (bisection).

    Raises ValueError if the target lies outside what any r can reach: the layers before the first
    module always see all N_0 tokens, so N_bar >= N_0 (first module layer + 1) / num_layers.
    """
    low_end = mean_tokens(0.0, n0, module_layers, num_layers)
    if not low_end <= n_target <= n0:
        raise ValueError(
            f"n_target={n_target:g} is unreachable with modules after layers {module_layers} of {num_layers}: "
            f"N_bar lies in [{low_end:g}, {n0:g}] (the layers before the first module keep every token, "
            f"every later one at least {MIN_STAGE_TOKENS:g})"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_tokens(mid, n0, module_layers, num_layers) < n_target else (lo, mid)
    return (lo + hi) / 2


def stage_targets(n_target: float, n0: float, module_layers: tuple[int, ...], num_layers: int) -> list[float]:
    """Mean tokens kept after each module, max(N_0 r^(m+1), 1), for the uniform keep ratio r."""
    r = uniform_keep_ratio(n_target, n0, module_layers, num_layers)
    return [max(n0 * r ** (m + 1), MIN_STAGE_TOKENS) for m in range(len(module_layers))]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    n_target: float | None = None,
    *,
    iterations: int = 24,
) -> dict[str, list[float]]:
    """Set every module's initial theta_r (theta_s for ``criteria="spatial"``) so that ``batch`` keeps
    the budget's stage counts.

    Args:
        model: a model with ATP applied (its redundancy heads are shifted through their bias).
        batch: model inputs (``input_ids``, ``attention_mask``, ``pixel_values``; ``labels`` so that
            answer tokens are excluded from the cross-modality score as in training).
        n_target: the budget (default: the model's ``ATPConfig.n_target``).
        iterations: bisection steps on each bias (logit space, between theta 1e-6 and 1 - 1e-4).
    Returns:
        ``{"target": [...], "kept": [...], "theta_r": [...], "saturated": [...]}`` per module: the
        stage count aimed at, the batch-mean count reached, the calibrated theta_r (at zero head
        weights), and whether theta_r ended at the edge of the search range (the budget asks for
        the floor of one token per sample; such a head starts where its sigmoid is flat).
    """
    from .api import _language_model, atp_config, last_atp_record

    config: ATPConfig = atp_config(model)
    lm = _language_model(model)
    n_target = config.n_target if n_target is None else float(n_target)
    was_training = model.training
    model.eval()

    first_layer_tokens = None
    targets, kept, thetas, saturated = [], [], [], []
    try:
        model(**batch)
        first_layer_tokens = float(last_atp_record(model).stage_counts[:, 0].float().mean())
        layers = (config.module_layers, lm.config.num_hidden_layers)
        lowest = mean_tokens(0.0, first_layer_tokens, *layers)
        if n_target < lowest:  # below what any split reaches: start as low as the floor allows
            warnings.warn(f"n_target={n_target:g} is below the reachable {lowest:g}; calibrating to {lowest:g}",
                          stacklevel=2)
        targets = stage_targets(max(n_target, lowest), first_layer_tokens, *layers)
        for m, target in enumerate(targets):
            module = lm.atp_modules[m]
            stage_mean = _stage_mean_of(model, batch, module)  # the batch-mean count after module m
            net = module.threshold_net
            bias = (net.spatial_head if config.criteria == "spatial" else net.redundancy_head).bias
            lo, hi = _logit(1e-6), _logit(1 - 1e-4)  # kept count falls as the bias rises
            for _ in range(iterations):
                mid = (lo + hi) / 2
                bias.fill_(mid)
                lo, hi = (mid, hi) if stage_mean() > target else (lo, mid)
            # Of the two brackets, keep the one whose count is closer to the target.
            candidates = []
            for b in (lo, hi):
                bias.fill_(b)
                candidates.append((abs(stage_mean() - target), b))
            bias.fill_(min(candidates)[1])
            kept.append(stage_mean())
            thetas.append(float(torch.sigmoid(bias.detach().float()).reshape(-1)[0]))
            saturated.append(bool(min(candidates)[1] >= _logit(1 - 1e-3)))
    finally:
        model.train(was_training)
    return {"target": targets, "kept": kept, "theta_r": thetas, "saturated": saturated,
            "first_layer_tokens": [first_layer_tokens]}


def _stage_mean_of(model: nn.Module, batch: Mapping[str, torch.Tensor], module: nn.Module) -> Callable[[], float]:
    """Run ``model`` on ``batch`` once, recording the arguments of ``module.decide``; return a function
    that gives the batch-mean count kept after ``module`` at its current parameters from those arguments
    alone (equal to ``stage_counts[:, m + 1].mean()`` of a full forward, which computes it the same way)."""
    calls = []
    decide = module.decide  # what the forward would call (an instance-level override included)

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return decide(*args, **kwargs)

    shadowed = vars(module).get("decide")  # an instance-level decide someone else set, put back after
    module.decide = record  # an instance attribute shadows the method for this one forward
    try:
        model(**batch)
    finally:
        if shadowed is None:
            del module.decide
        else:
            module.decide = shadowed
    if len(calls) != 1:
        raise RuntimeError(f"calibration: module {module.index} decided {len(calls)} times in one forward, "
                           "expected once")
    args, kwargs = calls[0]

    def stage_mean() -> float:
        return float(decide(*args, **kwargs).keep.sum(-1).float().mean())

    return stage_mean
