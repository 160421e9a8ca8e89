"""ATP against training-free baselines at matching token counts (the main Table 1 comparison).

Baselines run on the upper bound (:mod:`atp_repro.baselines`); each is evaluated on the same test
questions as ATP, so rate differences are paired over questions. A budget is a layer-average count
in grid units; one that a method's schedule cannot reach is moved to the nearest reachable value and
reported as such (``budget_used``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from atp_repro.baselines import VISION_SIDE_METHODS, module_layers_of, schedule
from atp_repro.efficiency.models import min_average_tokens

from .evaluate import EvalResult, token_summary
from .experiments import Setup


@dataclass
class BaselineRun:
    method: str
    label: str  # which budget (e.g. "ATP-144 tokens", "paper 128")
    budget_asked: float  # grid units, layer average
    budget_used: float
    layers: tuple[int, ...] | None
    result: EvalResult


def reachable_budget(method: str, budget: float, num_layers: int, num_vision: int,
                     layers: tuple[int, ...] | None = None, count_range: tuple[float, float] | None = None) -> float:
    """``budget`` moved into the range ``method``'s schedule can reach (unchanged when it can).
    ``count_range``: PruMerge+'s fewest and most tokens per image (it depends on the images)."""
    if method in VISION_SIDE_METHODS:  # before the language model: VisionZip from 2 up, PruMerge+ in its range
        low, high = count_range if count_range is not None else (2.0, float(num_vision))
        return float(min(max(budget, low), high, num_vision))
    floor = min_average_tokens(module_layers_of(schedule(method, num_layers, layers)), num_layers, num_vision)
    return float(min(max(budget, floor), num_vision))


def run_baselines(setup: Setup, methods: dict[str, tuple[int, ...] | None], budgets: dict[str, float]
                  ) -> list[BaselineRun]:
    """Every method (name -> its schedule's layers, None = its own default) at every budget (label -> grid
    tokens), evaluated on the test set (cached)."""
    num_layers = setup.world.model.lm_layers
    num_vision = setup.grid * setup.grid
    out = []
    ranges = {"prumerge+": setup.prumerge_range()} if "prumerge+" in methods else {}
    for label, budget in budgets.items():
        for method, layers in methods.items():
            used = reachable_budget(method, budget, num_layers, num_vision, layers, ranges.get(method))
            model, tok, info = setup.baseline(method, used, layers)
            out.append(BaselineRun(method, label, float(budget), used, layers, setup.evaluate(model, info, tok)))
    return out


def token_576(result: EvalResult) -> float:
    return token_summary(result.kept, result.grid)["tokens_576_equiv"]


def runs_frame(runs: list[BaselineRun]) -> pd.DataFrame:
    """One row per baseline run: method, budget label, asked / used / measured tokens (grid and 576-eq)."""
    rows = []
    for r in runs:
        tok = token_summary(r.result.kept, r.result.grid)
        rows.append({"method": r.method, "budget": r.label, "budget_asked": r.budget_asked,
                     "budget_used": r.budget_used, "tokens": tok["tokens"], "tokens_576_equiv": tok["tokens_576_equiv"],
                     "layers": "default" if r.layers is None else ",".join(map(str, r.layers))})
    return pd.DataFrame(rows)


def text_lengths(dataset, num_vision: int) -> list[int]:
    """Prompt tokens other than the image's, per question of ``dataset`` (what pruning never touches)."""
    return [len(dataset[i]["prompt_ids"]) - num_vision for i in range(len(dataset))]


def prefill_flops_fraction(result: EvalResult, model, text: list[int]) -> float:
    """Mean prefill FLOPs of ``result``'s questions as a fraction of the same questions unpruned.

    Each question's FLOPs come from the analytic formula of the Table 3 study
    (:func:`atp_repro.efficiency.flops.prefill_flops`, vision tower included) with its own prompt
    length (``text``, from :func:`text_lengths`) and its own per-layer vision counts (``result.kept``),
    so the attention's quadratic term is counted per question, not for an average length.
    """
    from atp_repro.efficiency.flops import ModelShapes, prefill_flops

    shapes = ModelShapes.from_config(model)
    if len(text) != len(result.kept):
        raise ValueError(f"text has {len(text)} lengths for {len(result.kept)} evaluated questions")
    pruned = sum(prefill_flops(shapes, t, [int(v) for v in kept]).total for t, kept in zip(text, result.kept))
    full = sum(prefill_flops(shapes, t).total for t in text)
    return pruned / full
