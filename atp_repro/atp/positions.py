"""Pruning positional encodings (supplementary Sec. 1.2).

After pruning, the surviving vision tokens no longer form a grid, and 1-D position ids carry the
2-D layout only implicitly. Three variants (choice; see README "Interpretations"):

- ``original``: kept tokens keep their original 1-D position ids (no new parameters; the
  frozen-LM-safe default: the LM sees exactly the positions it was trained with).
- ``rope2d``: in the layers after the first module, vision tokens rotate part of each head's
  frequency pairs by (image start + row) and (image start + col) instead of the 1-D position, in
  the spirit of Qwen2-VL's M-RoPE, with the row and column pairs interleaved across the spectrum.
  Text tokens are unchanged, so text-to-text attention is too.
- ``learned2d``: a zero-initialised learned row and column embedding is added to the surviving
  vision tokens at every ATP module (identity at initialisation).
"""

from __future__ import annotations

import torch
from torch import nn


def rope_section_ids(num_pairs: int, fractions: tuple[float, float, float]) -> torch.Tensor:
    """(num_pairs,) section of each rotary frequency pair: 0 = 1-D position, 1 = row, 2 = column.

    Pairs are dealt out *interleaved* across the spectrum (pair i goes to the section furthest below
    its share of the first i + 1 pairs; ties to the lower section), not in contiguous blocks: with
    blocks, the last section gets only the lowest frequencies, and at LLaVA's head size the column
    would rotate by under 0.1 rad across a 24-wide grid while the row turns by radians. Interleaved,
    every section spans the spectrum from its highest to its lowest frequencies, so row and column
    are encoded with comparable resolution (as in the interleaved M-RoPE of later Qwen-VL models).

    >>> rope_section_ids(8, (0.5, 0.25, 0.25)).tolist()
    [0, 1, 2, 0, 0, 1, 2, 0]
    """
    share = torch.tensor(fractions, dtype=torch.float64)
    assigned = torch.zeros(3, dtype=torch.float64)
    ids = []
    for i in range(num_pairs):
        deficit = share * (i + 1) - assigned
        section = int(torch.argmax(deficit))  # first maximum: ties go to the lower section
        assigned[section] += 1
        ids.append(section)
    return torch.tensor(ids, dtype=torch.long)


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
    """Rotary cos/sin where vision tokens encode (row, col) in two interleaved sets of frequency pairs.

    Args:
        inv_freq: (hd / 2,) inverse frequencies of the model's rotary embedding.
        position_ids: (B, L) 1-D positions.
        grid_index: (B, L) row-major index in the original vision grid, -1 for text.
        image_start: (B,) 1-D position of each sample's first vision token.
        fractions: shares of the pairs for (1-D, row, col), dealt out by :func:`rope_section_ids`.
    Returns:
        (cos, sin), each (B, L, hd), the layout of the model's rotary embedding.
    """
    num_pairs = inv_freq.shape[0]
    section = rope_section_ids(num_pairs, fractions).to(grid_index.device)  # (P,)
    is_vision = (grid_index >= 0)[..., None]  # (B, L, 1)
    row = torch.div(grid_index.clamp_min(0), grid_size, rounding_mode="floor")
    col = grid_index.clamp_min(0) % grid_size
    pos = position_ids.float()[..., None].expand(*position_ids.shape, num_pairs)  # (B, L, P)
    row_pos = (image_start[:, None] + row).float()[..., None]  # (B, L, 1)
    col_pos = (image_start[:, None] + col).float()[..., None]
    pos = torch.where(is_vision & (section == 1), row_pos, pos)
    pos = torch.where(is_vision & (section == 2), col_pos, pos)
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
