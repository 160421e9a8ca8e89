"""Spatial augmented pruning: scores from nested uniform sampling grids (pure tensor functions).

Pruning by attention alone can empty whole image regions. Spatial augmented pruning protects a
uniform skeleton of tokens: grids with strides such as 2, 3, 4, 6, 8, 12 sample the original
G x G vision grid. A token's spatial score is 1 - lambda_sample * R for the *sparsest* grid that
contains it (R = 1 / stride^2 is that grid's sampling rate), so the tokens of the sparsest grid
score highest and survive first; tokens on no grid score 0.

All grids share one offset, which makes them nested (a grid of stride s' contains every grid whose
stride is a multiple of s'); the offset centres the sparsest grid in the image (choice).
"""

from __future__ import annotations

import torch


def grid_offset(grid_size: int, strides: tuple[int, ...], width: int | None = None) -> tuple[int, int]:
    """Common (row, column) offset of all sampling grids on a ``grid_size`` x ``width`` grid (square
    by default): centres the sparsest grid that fits in the image along each axis."""
    width = grid_size if width is None else width
    fitting = [s for s in strides if s <= min(grid_size, width)] or [min(strides)]
    sparsest = max(fitting)
    return ((grid_size - 1) % sparsest) // 2, ((width - 1) % sparsest) // 2


def sparsest_stride(grid_size: int, strides: tuple[int, ...], width: int | None = None) -> torch.Tensor:
    """(H*W,) LongTensor: for each token (row-major) of a ``grid_size`` x ``width`` grid (square by
    default), the largest stride of a grid containing it, 0 if none."""
    width = grid_size if width is None else width
    row_offset, col_offset = grid_offset(grid_size, strides, width)
    rows, cols = torch.arange(grid_size), torch.arange(width)
    best = torch.zeros(grid_size, width, dtype=torch.long)
    for stride in sorted(strides):  # ascending: later (sparser) grids overwrite
        on_grid = ((rows - row_offset) % stride == 0)[:, None] & ((cols - col_offset) % stride == 0)[None, :]
        best = torch.where(on_grid, torch.full_like(best, stride), best)
    return best.flatten()


def spatial_scores(grid_size: int, strides: tuple[int, ...], lambda_sample: float,
                   width: int | None = None) -> torch.Tensor:
    """(H*W,) float spatial score S_s of every token of the original ``grid_size`` x ``width`` grid
    (square by default; a non-square grid is e.g. a dynamic-resolution image), row-major.

    >>> s = spatial_scores(24, (2, 3, 4, 6, 8, 12), 2.0)
    >>> float(s.max()) < 1.0 and float(s.min()) == 0.0
    True
    """
    if not 0 < lambda_sample <= 4:
        raise ValueError(f"lambda_sample={lambda_sample} must lie in (0, 4] so that scores stay in [0, 1)")
    stride = sparsest_stride(grid_size, strides, width).float()
    rate = torch.where(stride > 0, 1.0 / stride.clamp_min(1.0) ** 2, torch.zeros_like(stride))
    return torch.where(stride > 0, 1.0 - lambda_sample * rate, torch.zeros_like(stride))


def grid_size_for(num_vision_tokens: int) -> int:
    """Side G of a square G x G vision grid with ``num_vision_tokens`` tokens."""
    side = int(round(num_vision_tokens**0.5))
    if side * side != num_vision_tokens:
        raise ValueError(
            f"ATP needs a square vision grid; got {num_vision_tokens} image tokens per sample, "
            "which is not a perfect square"
        )
    return side


def vision_grid(num_vision_tokens: int, tile_side: int | None = None) -> tuple[int, int]:
    """``(G, tiles)``: the image span is ``tiles`` G x G grids one after another (row-major each).

    One square grid is the LLaVA-1.5 case. Several tiles are how LLaVA-NeXT-style inputs reach
    more tokens (e.g. 5 crops of 24 x 24 = 2880): the vision tower encodes each crop on its own
    ``tile_side`` x ``tile_side`` grid, and the spatial rule samples every tile with the same nested
    grids. Tiles stack downwards, so token t sits at row ``t // G`` (continuing across tiles) and
    column ``t % G``: the layout the 2-D positional encodings read.

    >>> vision_grid(576), vision_grid(2880, 24)
    ((24, 1), (24, 5))
    """
    if tile_side is not None and tile_side > 0 and num_vision_tokens % (tile_side * tile_side) == 0:
        return tile_side, num_vision_tokens // (tile_side * tile_side)
    try:
        return grid_size_for(num_vision_tokens), 1
    except ValueError:
        tiles = "" if tile_side is None else f" or a multiple of the vision tower's {tile_side} x {tile_side} grid"
        raise ValueError(f"ATP needs a square vision grid{tiles}; got {num_vision_tokens} image tokens per "
                         "sample") from None
