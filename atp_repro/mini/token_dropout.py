"""Vision-token dropout: train the mini upper bound to answer when deeper layers lose vision tokens.

LLaVA-1.5 pays little attention to image tokens after its first few layers (FastV measured it; ATP,
FastV and PyramidDrop all rely on it): the answer-relevant content has moved into the text positions
by then, so most image tokens can be dropped in deep layers. A small decoder trained from scratch on
the mini world does not acquire that property by itself. This device gives it to the upper bound
during its training: in a random half of the training samples, from a random decoder layer on, a
random subset of the vision tokens is hidden as attention keys (every query still sees itself).

The subset is uniformly random, not chosen by any pruning score, so the upper bound learns *that*
tokens may go missing, not *which* tokens a particular method keeps. Evaluation never drops anything.

Shapes: B batch, L sequence length, N decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atp_repro.atp.masks import causal_padding_mask


@dataclass(frozen=True)
class TokenDropoutConfig:
    """``p``: fraction of samples that lose tokens; from a layer drawn in ``[min_layer, N - 1]`` they
    keep a fraction of their vision tokens drawn uniformly from ``[0, max_keep]``."""

    p: float = 0.5
    min_layer: int = 1
    max_keep: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"TokenDropoutConfig.p must be in [0, 1], got {self.p}")
        if not (isinstance(self.min_layer, int) and self.min_layer >= 1):
            raise ValueError(f"TokenDropoutConfig.min_layer must be an int >= 1, got {self.min_layer!r}")
        if not 0.0 <= self.max_keep <= 1.0:
            raise ValueError(f"TokenDropoutConfig.max_keep must be in [0, 1], got {self.max_keep}")


def draw_plan(image_mask: torch.Tensor, num_layers: int, cfg: TokenDropoutConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which vision keys each sample hides, and from which layer.

    Args:
        image_mask: (B, L) bool, vision positions.
    Returns:
        start: (B,) long, first layer that hides keys (``num_layers`` = never).
        hidden: (B, L) bool, vision positions hidden as keys from ``start`` on.
    """
    batch, length = image_mask.shape
    if cfg.min_layer >= num_layers:
        raise ValueError(f"TokenDropoutConfig.min_layer must be < num_layers={num_layers}, got {cfg.min_layer}")
    drop = torch.rand(batch, generator=generator) < cfg.p
    layer = torch.randint(cfg.min_layer, num_layers, (batch,), generator=generator)
    start = torch.where(drop, layer, torch.full_like(layer, num_layers))
    keep_fraction = torch.rand(batch, generator=generator) * cfg.max_keep  # (B,)
    u = torch.rand(batch, length, generator=generator)
    hidden = image_mask & (u >= keep_fraction[:, None]) & drop[:, None]
    return start, hidden


def dropout_bias(hidden: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, L, L) attention mask: causal, padding keys and ``hidden`` keys masked, the
    diagonal always open (a query sees itself, so no row is empty)."""
    valid = torch.ones_like(hidden) if attention_mask is None else attention_mask.bool()
    bias = causal_padding_mask(valid & ~hidden, dtype)  # the ATP soft path's mask, with hidden keys as padding
    eye = torch.eye(hidden.shape[-1], dtype=torch.bool, device=hidden.device)
    return bias.masked_fill(eye, 0.0)


class VisionTokenDropout:
    """Hooks on a LLaVA model that apply :func:`draw_plan` in training mode only.

    A forward pre-hook on the top model reads ``input_ids`` and ``attention_mask`` and draws the
    batch's plan (from ``seed`` and the batch's token ids, so it does not depend on what ran before);
    a pre-hook on each decoder layer swaps its attention mask for the dropout mask from the sample's
    start layer on. ``remove()`` takes the hooks off.
    """

    def __init__(self, model: nn.Module, cfg: TokenDropoutConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.image_token_id = model.config.image_token_id
        layers = model.model.language_model.layers
        self.num_layers = len(layers)
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._handles = [model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        self._model = model

    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict):
        self._plan = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not module.training or input_ids is None:
            return None
        # Seeded by the batch's content: a training resumed from a checkpoint draws the same plans.
        weights = torch.arange(1, input_ids.shape[-1] + 1, device=input_ids.device)
        content = int((input_ids.long() * weights).sum()) % (2**31)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + content)
        start, hidden = draw_plan(input_ids == self.image_token_id, self.num_layers, self.cfg, generator)
        self._plan = (start, hidden, kwargs.get("attention_mask"))
        return None

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._plan is None:
                return None
            start, hidden, attention_mask = self._plan
            active = start <= index  # (B,)
            if not bool(active.any()):
                return None
            h = args[0] if args else kwargs["hidden_states"]
            mask = dropout_bias(hidden & active[:, None], attention_mask, h.dtype)
            return args, {**kwargs, "attention_mask": mask}

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._plan = None
