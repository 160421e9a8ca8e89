"""Image-independent selection scores for the control baselines (pure tensor functions).

``uniform``: a spatially uniform subset. Tokens on the sparsest of the nested sampling grids of
spatial augmented pruning come first (:func:`atp_repro.atp.spatial.spatial_scores`), and within one
grid level the van der Corput order of the row-major index breaks ties, so any count k picks
tokens spread over the whole image rather than the top rows.

``random``: one fixed random order of the grid positions (seeded), the same for every image; a
count k keeps the first k of it.
"""

from __future__ import annotations

import torch

from .spatial import spatial_scores

CONTROL_IMPORTANCES = ("uniform", "random")
RANDOM_SEED = 0


def van_der_corput(n: int) -> torch.Tensor:
    """(n,) radical inverse in base 2 of 0..n-1: a well-spread ordering of [0, 1)."""
    out = torch.zeros(n, dtype=torch.float64)
    index = torch.arange(n)
    scale = 0.5
    while bool((index > 0).any()):
        out += (index % 2).double() * scale
        index = index // 2
        scale /= 2
    return out


def control_scores(kind: str, grid_size: int, strides: tuple[int, ...], lambda_sample: float,
                   width: int | None = None) -> torch.Tensor:
    """(H*W,) float scores (higher = kept first) of every position of a ``grid_size`` x ``width`` grid
    (square by default), row-major."""
    n = grid_size * (grid_size if width is None else width)
    if kind == "uniform":
        level = spatial_scores(grid_size, strides, lambda_sample, width).double()  # in [0, 1)
        # Level gaps are >= lambda_sample * (1/s^2 - 1/s'^2) > 1e-3 for strides up to 24; the
        # tie-break stays below that.
        return (level + 1e-4 * (1.0 - van_der_corput(n))).float()
    if kind == "random":
        generator = torch.Generator().manual_seed(RANDOM_SEED)
        return torch.rand(n, generator=generator)
    raise ValueError(f"kind must be one of {CONTROL_IMPORTANCES}, got {kind!r}")
