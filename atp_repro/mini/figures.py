"""Drawing helpers for the mini world: scenes with the vision tokens each ATP module keeps."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import Collator, MiniVQA


def kept_mask(indices: torch.Tensor | np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) bool mask of the kept original grid indices (0..grid*grid-1, row-major)."""
    mask = np.zeros(grid * grid, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return mask.reshape(grid, grid)


def overlay(image: np.ndarray, mask: np.ndarray, dim: float = 0.25) -> np.ndarray:
    """The image with pruned patches darkened to ``dim`` of their brightness."""
    h, w, _ = image.shape
    g = mask.shape[0]
    up = np.kron(mask, np.ones((h // g, w // g), dtype=bool))
    out = image.astype(np.float32)
    out[~up] *= dim
    return out.clip(0, 255).astype(np.uint8)


@torch.inference_mode()
def surviving_regions(model: Any, dataset: MiniVQA, index: int) -> list[np.ndarray]:
    """Per ATP module, the (grid, grid) mask of vision tokens still alive after it, for one test sample."""
    from atp_repro import last_atp_record  # the core method

    model.eval()
    batch = Collator(dataset.tokenizer.pad_token_id, mode="generate")([dataset[index]])
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    grid = int(round(dataset.n_image_tokens**0.5))
    record = last_atp_record(model)
    return [kept_mask(per_module[0].cpu(), grid) for per_module in record.kept_vision_indices]
