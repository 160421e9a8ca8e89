"""A mini-world batch as each architecture's forward takes it (LLaVA: (B, 3, H, W) pixels; Qwen2-VL:
flattened patches with their grids and token types, as its processor returns them)."""

from __future__ import annotations

import torch


def is_qwen(model: torch.nn.Module) -> bool:
    from atp_repro.atp.architectures import MROPE, architecture_of

    return architecture_of(model) == MROPE


def qwen_image_inputs(pixel_values: torch.Tensor, input_ids: torch.Tensor, config) -> dict:
    """(B, 3, H, W) images -> what the Qwen2-VL processor returns beside the ids (``config``: the model's):
    patches flattened in Qwen2-VL's order (each merge x merge block of patches consecutive, blocks
    row-major; a still image fills both temporal slots of a patch), ``image_grid_thw`` and
    ``mm_token_type_ids``."""
    vision = config.vision_config
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    b, c, h, w = pixel_values.shape
    gh, gw = h // p, w // p
    x = pixel_values[:, None].expand(b, t, c, h, w)
    x = x.reshape(b, t, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (B, gh/m, gw/m, m, m, C, T, p, p)
    patches = x.reshape(b * gh * gw, c * t * p * p)
    grid_thw = torch.tensor([[1, gh, gw]] * b)
    return {"pixel_values": patches, "image_grid_thw": grid_thw,
            "mm_token_type_ids": (input_ids == config.image_token_id).int()}


def model_inputs(model: torch.nn.Module, batch: dict, keys=("input_ids", "attention_mask", "pixel_values",
                                                            "labels")) -> dict:
    """The model's forward arguments from a mini-world batch (images converted for Qwen2-VL)."""
    inputs = {k: batch[k] for k in keys if k in batch}
    if is_qwen(model) and "pixel_values" in inputs:
        inputs.update(qwen_image_inputs(inputs["pixel_values"], inputs["input_ids"], model.config))
    return inputs
