"""One ATP module: scores -> instance thresholds -> keep decision (soft or hard).

The module owns only small parameters (its threshold network and, for ``learned2d``, a grid
embedding); everything it needs from the language model arrives as tensors, so it can be tested
without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ATPConfig
from .masks import hard_keep, keep_mask, top_k_keep
from .positions import LearnedGridEmbedding
from .scores import modality_importances, normalise_scores, redundancy_score
from .thresholds import ThresholdNetwork, num_threshold_features, threshold_features


@dataclass
class ModuleDecision:
    """What one module decided for a batch (sequence layout, shapes (B, L) unless stated)."""

    self_importance: torch.Tensor
    cross_importance: torch.Tensor
    redundancy: torch.Tensor
    spatial: torch.Tensor
    theta_r: torch.Tensor  # (B,)
    theta_s: torch.Tensor  # (B,)
    keep: torch.Tensor  # bool: vision tokens alive after the module (hard decision)
    keep_value: torch.Tensor | None  # float D after the module (soft path only)
    keep_surrogate: torch.Tensor | None = None  # smooth D whose log the attention bias differentiates (STE)


class ATPModule(nn.Module):
    """Adaptive pruning after one decoder layer."""

    def __init__(self, config: ATPConfig, index: int, hidden_size: int, grid_size: int) -> None:
        super().__init__()
        self.index = index
        self.fixed_keep = None if config.fixed_keep is None else config.fixed_keep[index]
        self.temperature = config.temperature
        self.ste_temperature = config.ste_temperature
        self.score_gradient = config.score_gradient
        self.normalisation = config.score_normalisation
        self.quantiles = config.threshold_quantiles
        self.importance = config.importance
        self.criteria = config.criteria
        self.threshold_net = ThresholdNetwork(
            num_threshold_features(config.threshold_quantiles),
            config.threshold_hidden,
            config.init_keep_threshold,
            config.init_spatial_threshold,
        )
        self.grid_embedding = (
            LearnedGridEmbedding(grid_size, hidden_size) if config.position_encoding == "learned2d" else None
        )

    def decide(
        self,
        column_sums: torch.Tensor,
        vision_weight: torch.Tensor,
        prompt_weight: torch.Tensor,
        spatial: torch.Tensor,
        is_vision: torch.Tensor,
        alive: torch.Tensor,
        initial_count: int | torch.Tensor,
        keep_value: torch.Tensor | None,
        keep_surrogate: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ) -> ModuleDecision:
        """Decide which vision tokens survive.

        Args:
            column_sums: (B, L, 2) attention received, weighted by vision / prompt queries.
            vision_weight, prompt_weight: (B, L) query weights used for ``column_sums``.
            spatial: (B, L) spatial scores S_s (0 for text).
            is_vision: (B, L) bool, vision positions (alive or not) of real (non-padding) tokens.
            alive: (B, L) bool, vision tokens alive before this module.
            initial_count: vision tokens per sample before any module (N_0): an int, or (B,) when samples differ
                (dynamic resolution; 0 for a text-only sample).
            keep_value: (B, L) soft keep values D_prev (soft path) or None (hard path).
            keep_surrogate: (B, L) smooth keep values before the module (straight-through soft path).
            control: (B, L) image-independent scores that replace S_r for the ``uniform`` and
                ``random`` controls (None otherwise).
        """
        # Self- and cross-modality scores travel stacked, (B, 2, L): one op serves both.
        importance = modality_importances(column_sums, vision_weight, prompt_weight)
        normalised = normalise_scores(importance, alive[:, None], self.normalisation)
        if control is not None:
            redundancy = torch.where(alive, control, 0.0)
        else:
            redundancy = redundancy_score(normalised[:, 0], normalised[:, 1], self.importance)
        kept_fraction = alive.sum(-1).float() / torch.as_tensor(initial_count, device=alive.device).clamp_min(1)
        # The threshold network reads the score distribution, not the scores' gradient path.
        features = threshold_features(normalised.detach(), alive, kept_fraction, self.quantiles)
        theta_r, theta_s = self.threshold_net(features)

        # A criterion switched off (component ablation) decides on scores no threshold passes: its
        # mask is exactly 0 and it sends no gradient to its threshold.
        never = torch.full_like(redundancy, -math.inf)
        by_redundancy = never if self.criteria == "spatial" else redundancy
        by_spatial = never if self.criteria == "redundancy" else spatial
        surrogate = None
        if self.fixed_keep is not None:
            keep = top_k_keep(redundancy, alive, self.fixed_keep)
            mask = keep.float()
        else:
            keep = hard_keep(by_redundancy, by_spatial, theta_r, theta_s, alive)
            mask = None
            if keep_value is not None:
                mask, surrogate = keep_mask(by_redundancy, by_spatial, theta_r, theta_s, self.temperature,
                                            self.ste_temperature, detach_scores=not self.score_gradient)
        new_keep_value = new_surrogate = None
        if keep_value is not None:
            # D = D_prev * M accumulates on vision positions; text keeps D = 1.
            new_keep_value = torch.where(is_vision, keep_value * mask, keep_value)
            keep = is_vision & (new_keep_value > 0.5)
            if surrogate is not None:
                previous = keep_value if keep_surrogate is None else keep_surrogate
                new_surrogate = torch.where(is_vision, previous * surrogate, previous)
        return ModuleDecision(importance[:, 0], importance[:, 1], redundancy, spatial, theta_r, theta_s, keep,
                              new_keep_value, new_surrogate)
