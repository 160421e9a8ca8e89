"""Pruning positional encodings (supplementary Sec. 1.2).

After pruning, the surviving vision tokens no longer form a grid, and 1-D position ids carry the
2-D layout only implicitly. Three variants (choice; see README "Interpretations"):

- ``original``: kept tokens keep their original 1-D position ids (no new parameters; the
  frozen-LM-safe default: the LM sees exactly the positions it was trained with).
- ``rope2d``: in the layers after the first module, vision tokens rotate part of each head's
  frequency pairs by (image start + row) and (image start + col) instead of the 1-D position, in
  the spirit of Qwen2-VL's M-RoPE. Text tokens are unchanged, so text-to-text attention is too.
- ``learned2d``: a zero-initialised learned row and column embedding is added to the surviving
  vision tokens at every ATP module (identity at initialisation).
"""

from __future__ import annotations

import torch
from torch import nn


def rope_sections(num_pairs: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split ``num_pairs`` rotary frequency pairs into (1-D, row, col) sections."""
    row = int(round(fractions[1] * num_pairs))
    col = int(round(fractions[2] * num_pairs))
    return num_pairs - row - col, row, col


def rope2d_cos_sin(
    inv_freq: torch.Tensor,
    attention_scaling: float,
    position_ids: torch.Tensor,
    grid_index: torch.Tensor,
    grid_size: int,
    image_start: torch.Tensor,
    fractions: tuple[float, float, float],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin where vision tokens encode (row, col) in two frequency sections.

    Args:
        inv_freq: (hd / 2,) inverse frequencies of the model's rotary embedding.
        position_ids: (B, L) 1-D positions.
        grid_index: (B, L) row-major index in the original vision grid, -1 for text.
        image_start: (B,) 1-D position of each sample's first vision token.
    Returns:
        (cos, sin), each (B, L, hd), the layout of the model's rotary embedding.
    """
    num_pairs = inv_freq.shape[0]
    n_1d, n_row, _ = rope_sections(num_pairs, fractions)
    is_vision = grid_index >= 0
    row = torch.div(grid_index.clamp_min(0), grid_size, rounding_mode="floor")
    col = grid_index.clamp_min(0) % grid_size
    pos = position_ids.float()[..., None].expand(*position_ids.shape, num_pairs).clone()  # (B, L, P)
    row_pos = (image_start[:, None] + row).float()
    col_pos = (image_start[:, None] + col).float()
    pos[..., n_1d : n_1d + n_row] = torch.where(is_vision[..., None], row_pos[..., None], pos[..., n_1d : n_1d + n_row])
    pos[..., n_1d + n_row :] = torch.where(is_vision[..., None], col_pos[..., None], pos[..., n_1d + n_row :])
    freqs = pos * inv_freq.float()  # (B, L, P)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


class LearnedGridEmbedding(nn.Module):
    """Zero-initialised (row, col) embedding added to surviving vision tokens."""

    def __init__(self, grid_size: int, hidden_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.row = nn.Embedding(grid_size, hidden_size)
        self.col = nn.Embedding(grid_size, hidden_size)
        nn.init.zeros_(self.row.weight)
        nn.init.zeros_(self.col.weight)

    def forward(self, grid_index: torch.Tensor) -> torch.Tensor:
        """grid_index: (B, L), -1 for text -> (B, L, D) additive embedding (zero for text)."""
        is_vision = (grid_index >= 0)[..., None]
        idx = grid_index.clamp_min(0)
        emb = self.row(torch.div(idx, self.grid_size, rounding_mode="floor")) + self.col(idx % self.grid_size)
        return emb * is_vision.to(emb.dtype)
