"""Training-free token-pruning baselines behind ATP's interface and token accounting.

Every method here prunes inside the language model at fixed per-stage counts, through the same
pruned forward as ATP (:func:`atp_repro.apply_atp` with ``fixed_keep``). They therefore share ATP's
guarantees: left-padded batches with per-sample counts, the shorter KV cache in ``generate``, the
fast-kernel scoring path, and :func:`atp_repro.token_counts` for the accounting.

=============  =================================================================================
method         rule
=============  =================================================================================
``fastv``      FastV (Chen et al. 2024): after decoder layer K (0-based K - 1 scores, layers K..
               keep k), rank vision tokens by the head-averaged attention they receive from the
               last token of the prompt and keep the top k. FastV's public code reads the
               attention of the layer just before K, as here. Default K: the paper's K = 2 of 32
               layers scaled to the model's depth (at least 1).
``pyramiddrop`` PyramidDrop (Xing et al. 2024): stages end after layers L/4, L/2, 3L/4 (its
               ``layer_list`` [8, 16, 24] of 32); at each stage end the last instruction token's
               attention ranks the surviving vision tokens and a fixed ratio lambda of them is kept
               (its ``image_token_ratio_list`` [1, lambda, lambda^2, lambda^3]). Scores come from the
               stage's own queries and keys, which with a fast kernel are recomputed for the score
               block only (PyramidDrop's q.k recomputation).
``sparsevlm``  SparseVLM (Zhang et al. 2024), without its token recycling: text *raters* (prompt
               tokens whose embedding relevance to the image is above the prompt's mean) are chosen
               once from the input embeddings; after layers 2, 6 and 15 of 32 (its ``pruning_loc``)
               the vision tokens with the most mean attention from the raters are kept, fewer at
               each stage.
``uniform``    control: a spatially uniform subset of the grid, at FastV's layer and count.
``random``     control: one fixed random subset of the grid (seeded), at FastV's layer and count.
``visionzip``  VisionZip (Yang et al. 2024), before the language model: dominant tokens by the
               vision encoder's CLS attention plus contextual tokens merged by key similarity
               (:mod:`atp_repro.prellm`); the same count in every image.
``prumerge+``  LLaVA-PruMerge+ (Shang et al. 2024), before the language model: CLS-attention
               outliers (IQR rule) plus spatially uniform tokens, pruned tokens merged into the kept
               ones by key similarity (:mod:`atp_repro.prellm`); the count adapts per image.
=============  =================================================================================

Budgets are in ATP's unit: vision tokens averaged over all decoder layers (the paper's "Token"); a
method before the language model keeps its tokens in every layer, so its budget is its count per
image (PruMerge+: on average, its stride set on calibration images). For
an in-LLM budget b the per-stage counts are solved so that the layer average is b up to rounding (within
half a token). A budget a schedule cannot reach (its unpruned first layers alone exceed it) is
rejected before any work, naming the smallest reachable budget.
"""

from __future__ import annotations

import math

from torch import nn

from .atp import ATPConfig, apply_atp
from .atp.config import PAPER_NUM_LAYERS
from .efficiency.models import average_vision_tokens, min_average_tokens

IN_LLM_METHODS = ("fastv", "pyramiddrop", "sparsevlm", "uniform", "random")
VISION_SIDE_METHODS = ("visionzip", "prumerge+")  # prune before the language model (atp_repro.prellm)
METHODS = IN_LLM_METHODS + VISION_SIDE_METHODS
FASTV_PAPER_K = 2  # FastV's default K on 32-layer LLaVA-1.5
PYRAMIDDROP_PAPER_LAYERS = (8, 16, 24)  # PyramidDrop's layer_list on 32-layer LLaVA-1.5 (stage ends)
SPARSEVLM_PAPER_LAYERS = (3, 7, 16)  # first layers after SparseVLM's pruning_loc (2, 6, 15) on 32 layers
MULTI_STAGE_METHODS = ("pyramiddrop", "sparsevlm")


def fastv_layer(num_layers: int) -> int:
    """FastV's K (the first decoder layer that sees the pruned sequence) scaled to ``num_layers``."""
    return max(1, round(FASTV_PAPER_K * num_layers / PAPER_NUM_LAYERS))


def _scaled_stage_starts(paper_starts: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    layers = sorted({max(1, round(x * num_layers / PAPER_NUM_LAYERS)) for x in paper_starts})
    return tuple(x for x in layers if x < num_layers)


def pyramiddrop_layers(num_layers: int) -> tuple[int, ...]:
    """PyramidDrop's stage ends (first layers of the next stages) scaled to ``num_layers``."""
    return _scaled_stage_starts(PYRAMIDDROP_PAPER_LAYERS, num_layers)


def sparsevlm_layers(num_layers: int) -> tuple[int, ...]:
    """SparseVLM's pruned stages (first layers after its ``pruning_loc``) scaled to ``num_layers``."""
    return _scaled_stage_starts(SPARSEVLM_PAPER_LAYERS, num_layers)


def schedule(method: str, num_layers: int, layers: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The first decoder layer of each pruned stage for ``method``: its default, or ``layers`` checked."""
    if method not in IN_LLM_METHODS:
        if method in VISION_SIDE_METHODS:
            raise ValueError(f"{method} prunes before the language model: it has no decoder-layer schedule")
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if layers is None:
        defaults = {"pyramiddrop": pyramiddrop_layers, "sparsevlm": sparsevlm_layers}
        layers = defaults[method](num_layers) if method in defaults else (fastv_layer(num_layers),)
    layers = tuple(int(x) for x in layers)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= num_layers:
        raise ValueError(f"layers must be increasing decoder layers in [1, {num_layers - 1}], got {layers!r}")
    if method not in MULTI_STAGE_METHODS and len(layers) != 1:
        raise ValueError(f"layers for {method} must name one layer K, got {layers!r}")
    return layers


def module_layers_of(starts: tuple[int, ...]) -> tuple[int, ...]:
    """ATP's convention for a schedule: the module after layer l prunes from layer l + 1 on."""
    return tuple(s - 1 for s in starts)


def stage_counts(method: str, budget: float, num_layers: int, num_vision: int,
                 layers: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(first layers of each pruned stage, tokens kept in each) for ``method`` at ``budget``.

    ``layers`` overrides the method's default schedule (FastV / controls: one layer K; PyramidDrop:
    its stage ends), given as the first decoder layer that sees each pruned stage.
    """
    layers = schedule(method, num_layers, layers)
    modules = module_layers_of(layers)
    floor = min_average_tokens(modules, num_layers, num_vision)
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and floor <= budget <= num_vision):
        raise ValueError(
            f"budget must be a number of vision tokens (layer average) in [{floor:g}, {num_vision}] for "
            f"{method} with its first pruning before layer {layers[0]} of {num_layers}; got {budget!r}"
        )
    if len(layers) == 1:
        k = (budget * num_layers - layers[0] * num_vision) / (num_layers - layers[0])
        return layers, (min(num_vision, max(0, round(k))),)
    # PyramidDrop (and SparseVLM here): one ratio lambda per stage, kept counts N * lambda^s; the layer
    # average grows with lambda, so bisection finds it. (efficiency.models.solve_fixed_keep solves the same geometric
    # schedule but insists on an exact integer average, which an achieved ATP count rarely allows.)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        counts = tuple(num_vision * mid ** (s + 1) for s in range(len(layers)))
        lo, hi = (mid, hi) if average_vision_tokens(counts, modules, num_layers, num_vision) < budget else (lo, mid)
    ratio = (lo + hi) / 2
    return layers, tuple(min(num_vision, round(num_vision * ratio ** (s + 1))) for s in range(len(layers)))


def baseline_config(method: str, budget: float, num_layers: int, num_vision: int,
                    layers: tuple[int, ...] | None = None, scoring_backend: str = "auto") -> ATPConfig:
    """The fixed-count pruning config of ``method`` at ``budget`` (layer-average vision tokens)."""
    starts, counts = stage_counts(method, budget, num_layers, num_vision, layers)
    importance = {"fastv": "last", "pyramiddrop": "last", "sparsevlm": "raters"}.get(method, method)
    return ATPConfig(module_layers=module_layers_of(starts), fixed_keep=counts, importance=importance,
                     criteria="redundancy", position_encoding="original", scoring_backend=scoring_backend)


def apply_baseline(model: nn.Module, method: str, budget: float, layers: tuple[int, ...] | None = None,
                   scoring_backend: str = "auto", calibration=None) -> nn.Module:
    """Prune ``model`` (a transformers LLaVA) with ``method`` at ``budget``, in place; returns it.

    ``calibration``: pixel values of a few images, needed by PruMerge+ to set its stride for the budget.

    >>> model = apply_baseline(llava, "fastv", budget=144)  # doctest: +SKIP
    >>> model.generate(**inputs); baseline_token_counts(model).float().mean()  # doctest: +SKIP
    """
    if method in VISION_SIDE_METHODS:
        if layers is not None:
            raise ValueError(f"layers: {method} prunes before the language model; it takes no decoder layers")
        from .prellm import apply_reduction, reduction_for_budget

        return apply_reduction(model, reduction_for_budget(model, method, budget, calibration))
    if method not in IN_LLM_METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    lm_config = model.config.get_text_config()
    num_vision = int(getattr(model.config, "image_seq_length", 576))
    cfg = baseline_config(method, budget, lm_config.num_hidden_layers, num_vision, layers, scoring_backend)
    return apply_atp(model, cfg)


def baseline_token_counts(model: nn.Module):
    """(B, num_layers) vision tokens entering each decoder layer in the last forward with images, for a
    model with ATP modules, an in-LLM baseline or a vision-side reduction."""
    from .atp import token_counts
    from .prellm import has_reduction, reduction_counts

    return reduction_counts(model) if has_reduction(model) else token_counts(model)
