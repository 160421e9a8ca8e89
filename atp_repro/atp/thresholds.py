"""The learned per-instance thresholds of an ATP module.

A small MLP with a shared trunk and two sigmoid heads predicts theta_r (redundancy) and theta_s
(spatial) for every sample. Its input must not depend on how many tokens are still alive, so it
sees sorted-score quantiles and means of the two normalised importances, plus the kept fraction.
The output layer starts at zero with biases set so that almost every token is kept at step 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .scores import masked_quantiles


def threshold_features(
    scores: torch.Tensor,
    alive: torch.Tensor,
    kept_fraction: torch.Tensor,
    quantiles: tuple[float, ...],
) -> torch.Tensor:
    """Count-independent description of one module's score distribution.

    Args:
        scores: (B, S, L) normalised importances stacked (S = 2: self, cross; sequence layout).
        alive: (B, L) bool, live vision tokens.
        kept_fraction: (B,) live vision tokens / original vision tokens.
    Returns:
        (B, S * (len(quantiles) + 1) + 1) features: for each score its quantiles and mean, then
        the kept fraction.
    """
    alive = alive[:, None]  # (B, 1, L)
    scores = scores.float()
    count = alive.sum(-1).clamp_min(1).float()  # (B, 1)
    mean = torch.where(alive, scores, 0.0).sum(-1) / count  # (B, S)
    per_score = torch.cat([masked_quantiles(scores, alive, quantiles), mean[..., None]], -1)  # (B, S, Q + 1)
    return torch.cat([per_score.flatten(1), kept_fraction.float()[:, None]], dim=-1)


def num_threshold_features(quantiles: tuple[float, ...]) -> int:
    return 2 * (len(quantiles) + 1) + 1


class ThresholdNetwork(nn.Module):
    """features (B, F) -> (theta_r, theta_s), each (B,) in (0, 1)."""

    def __init__(self, num_features: int, hidden: int, init_keep: float, init_spatial: float) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU())
        self.redundancy_head = nn.Linear(hidden, 1)
        self.spatial_head = nn.Linear(hidden, 1)
        self.init_keep = init_keep
        self.init_spatial = init_spatial
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero output weights: theta starts at exactly sigmoid(bias) for every instance.
        for head, theta in ((self.redundancy_head, self.init_keep), (self.spatial_head, self.init_spatial)):
            nn.init.zeros_(head.weight)
            nn.init.constant_(head.bias, math.log(theta / (1 - theta)))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.redundancy_head.weight.dtype
        hidden = self.trunk(features.to(dtype))
        theta_r = torch.sigmoid(self.redundancy_head(hidden).float()).squeeze(-1)
        theta_s = torch.sigmoid(self.spatial_head(hidden).float()).squeeze(-1)
        return theta_r, theta_s
