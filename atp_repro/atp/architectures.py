"""What differs between the vision-language models ATP supports: positions and image grids.

Two families, both transformers' own classes:

- ``llava`` (``LlavaForConditionalGeneration``): the decoder takes 1-D position ids (B, L); each
  sample has one contiguous image span, a square G x G grid (or LLaVA-NeXT-style G x G tiles).
- ``mrope`` (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``): M-RoPE.
  The decoder takes position ids (3, B, L) for (temporal, height, width), or (4, B, L) with the
  text positions first (as ``generate`` passes them). Dynamic resolution: every image is its own
  h x w grid of merged patches (``image_grid_thw`` divided by ``spatial_merge_size``), and a sample
  may hold several images.

Pruning keeps each surviving token's rotary angles (cos, sin are computed once, before any module,
and travel with the token), so under M-RoPE a kept vision token keeps its (row, column) position:
the paper's "original positions" reading, which is 2-D by construction on this family.
"""

from __future__ import annotations

import torch
from torch import nn

LLAVA, MROPE = "llava", "mrope"

# class name -> family; checked by isinstance against the classes transformers provides
_FAMILIES = {
    "LlavaForConditionalGeneration": LLAVA,
    "Qwen2VLForConditionalGeneration": MROPE,
    "Qwen2_5_VLForConditionalGeneration": MROPE,
}
SUPPORTED = ("LlavaForConditionalGeneration (LLaVA-1.5 layout: one image span per sample, 1-D positions), "
             "Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration (M-RoPE, dynamic "
             "resolution, images; not videos)")


def architecture_of(model: nn.Module) -> str:
    """The family (``llava`` or ``mrope``) of a supported model; a clear error for any other class.

    Other VLMs with a decoder of the same shape would run and then fail, or prune wrongly, in forward."""
    import transformers

    for name, family in _FAMILIES.items():
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(model, cls):
            return family
    raise TypeError(f"apply_atp does not support {type(model).__name__}; supported: {SUPPORTED}")


def decoder_positions(family: str, position_ids: torch.Tensor | None, batch: int, length: int, past: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rope_ids, text_ids)``: what the rotary embedding takes, and (B, L) 1-D positions for the masks
    and the layers' ``position_ids`` argument.

    llava: both are the 1-D ids, (B, L). mrope: ``rope_ids`` is (3, B or 1, L); ``text_ids`` is the first
    row of a 4-row input, else 1-D positions counted from ``past`` (what the stock decoder assumes
    when it is given no text positions). ``position_ids=None`` means ``past .. past + length - 1``.
    """
    if position_ids is None:
        position_ids = (torch.arange(length, device=device) + past)[None]
    if family == LLAVA:
        ids = position_ids.expand(batch, -1)
        return ids, ids
    counted = (torch.arange(length, device=device) + past)[None].expand(batch, -1)
    if position_ids.dim() == 2:  # the same 1-D positions on the three axes (text only)
        return position_ids[None].expand(3, -1, -1), position_ids.expand(batch, -1)
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[1:], position_ids[0].expand(batch, -1)
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return position_ids, counted
    raise ValueError(f"M-RoPE position_ids must be (B, L), (3, B, L) or (4, B, L); got {tuple(position_ids.shape)}")


def merged_image_grids(image_grid_thw: torch.Tensor, merge: int) -> list[tuple[int, int, int]]:
    """(t, h, w) per image in the decoder's units: ``image_grid_thw`` rows (patches) with h and w divided
    by the vision tower's ``spatial_merge_size``."""
    grids = []
    for t, h, w in image_grid_thw.tolist():
        if h % merge or w % merge:
            raise ValueError(f"image_grid_thw row {(t, h, w)} is not divisible by spatial_merge_size={merge}")
        grids.append((int(t), int(h) // merge, int(w) // merge))
    return grids
