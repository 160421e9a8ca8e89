"""Analytic prefill FLOPs of a LLaVA model, layer by layer, with each layer's real sequence length.

One formula, stated once. A multiply-add counts as 2 FLOPs; only matrix products are counted
(norms, RoPE, softmax, activations, residual adds and biases are ignored: they are O(n d), not
O(n d^2) or O(n^2 d)). For a Llama decoder layer that receives ``n`` query tokens and attends to
``c`` keys (``c = n`` at prefill), with width d, H query heads and H_kv key/value heads of size
h, and SwiGLU width f::

    projections = 2 n d (H h)            # q
                + 2 * 2 n d (H_kv h)     # k, v   (grouped-query attention: H_kv <= H)
                + 2 n (H h) d            # o
    attention   = 2 H n c h              # scores  Q K^T  (dense rectangle, as eager computes it)
                + 2 H n c h              # mixing  P V
    mlp         = 3 * 2 n d f            # gate, up, down

After an ATP module the layer's n (and c) is ``text + kept vision tokens``: the sum over layers
uses each layer's actual length, which is how pruning saves FLOPs.

The vision tower (CLIP ViT, every layer is executed), the projector and the language-model head
(last position only at prefill, ``logits_to_keep=1``) are counted with the same rules::

    patch embedding = 2 N (3 p^2) D_v
    ViT layer       = 4 * 2 T D_v^2 + 2 * 2 T^2 D_v + 2 * 2 T D_v F_v      (T = N + 1 with CLS)
    projector       = 2 N D_v d + 2 N d d
    lm_head         = 2 * logits * d * V

:func:`measure_flops` counts the same quantity with ``torch.utils.flop_counter.FlopCounterMode``;
the tests check that both agree exactly on small models (eager attention, whose matmuls the
counter sees; CPU SDPA kernels are not registered with the counter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ModelShapes",
    "decoder_layer_flops",
    "vision_flops",
    "prefill_flops",
    "PrefillFlops",
    "atp_scoring_flops",
    "measure_flops",
]


@dataclass(frozen=True)
class ModelShapes:
    """The shapes the FLOPs formula needs, read from a ``LlavaConfig``."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    num_layers: int
    vocab_size: int
    vision_hidden: int
    vision_ffn: int
    vision_layers: int
    patch_size: int
    num_vision: int  # vision tokens per sample (all tiles)
    tiles: int = 1  # images the vision tower encodes per sample (LLaVA-NeXT-style crops)

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        """From a ``LlavaConfig`` (or a model: its ``.config`` is used)."""
        config = getattr(config, "config", config)
        text, vision = config.text_config, config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        grid = vision.image_size // vision.patch_size
        seq_length = getattr(config, "image_seq_length", 0) or 0
        tiles = seq_length // (grid * grid) if seq_length > grid * grid and seq_length % (grid * grid) == 0 else 1
        return cls(hidden=text.hidden_size, heads=text.num_attention_heads,
                   kv_heads=text.num_key_value_heads or text.num_attention_heads, head_dim=head_dim,
                   ffn=text.intermediate_size, num_layers=text.num_hidden_layers, vocab_size=text.vocab_size,
                   vision_hidden=vision.hidden_size, vision_ffn=vision.intermediate_size,
                   vision_layers=vision.num_hidden_layers, patch_size=vision.patch_size, num_vision=tiles * grid * grid,
                   tiles=tiles)


def decoder_layer_flops(n: int, c: int, s: ModelShapes) -> dict[str, int]:
    """FLOPs of one decoder layer with ``n`` queries and ``c`` keys (see the module docstring)."""
    if n < 0 or c < 0:
        raise ValueError(f"n={n}, c={c}: token counts must be >= 0")
    qo = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    return {
        "projections": 2 * n * s.hidden * qo + 2 * 2 * n * s.hidden * kv + 2 * n * qo * s.hidden,
        "attention": 2 * s.heads * n * c * s.head_dim * 2,
        "mlp": 3 * 2 * n * s.hidden * s.ffn,
    }


def vision_flops(s: ModelShapes) -> dict[str, int]:
    """FLOPs of the vision tower (all layers, with CLS) and the projector for one sample (all its tiles)."""
    n, d_v = s.num_vision // s.tiles, s.vision_hidden  # tokens per tile
    t = n + 1
    layer = 4 * 2 * t * d_v * d_v + 2 * 2 * t * t * d_v + 2 * 2 * t * d_v * s.vision_ffn
    return {
        "patch_embedding": s.tiles * 2 * n * 3 * s.patch_size ** 2 * d_v,
        "vision_layers": s.tiles * s.vision_layers * layer,
        "projector": s.tiles * (2 * n * d_v * s.hidden + 2 * n * s.hidden * s.hidden),
    }


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs of one prefill (per sample), split by part; ``per_layer`` holds the decoder layers."""

    vision: int
    language_model: int
    lm_head: int
    per_layer: tuple[int, ...]
    seq_lens: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.vision + self.language_model + self.lm_head

    def rows(self) -> list[dict[str, int]]:
        """Tidy rows: one per decoder layer (``layer``, ``tokens``, ``flops``)."""
        return [{"layer": i, "tokens": n, "flops": f} for i, (n, f) in enumerate(zip(self.seq_lens, self.per_layer))]


def prefill_flops(
    shapes: ModelShapes,
    text_tokens: int,
    vision_counts: Sequence[int] | None = None,
    *,
    logits: int = 1,
    include_vision: bool = True,
) -> PrefillFlops:
    """Prefill FLOPs of one sample.

    Args:
        shapes: model shapes (:meth:`ModelShapes.from_config`).
        text_tokens: text tokens in the prompt (never pruned).
        vision_counts: vision tokens entering each decoder layer (``None``: all of them, the
            upper bound); see :func:`atp_repro.efficiency.models.layer_vision_counts`.
        logits: positions whose logits are computed (1 at prefill; the sequence length for a
            plain ``model(**inputs)`` call).
        include_vision: count the vision tower and projector.
    """
    counts = list(vision_counts) if vision_counts is not None else [shapes.num_vision] * shapes.num_layers
    if len(counts) != shapes.num_layers:
        raise ValueError(f"vision_counts has {len(counts)} entries; the model has {shapes.num_layers} layers")
    seq = tuple(text_tokens + v for v in counts)
    per_layer = tuple(sum(decoder_layer_flops(n, n, shapes).values()) for n in seq)
    return PrefillFlops(
        vision=sum(vision_flops(shapes).values()) if include_vision else 0,
        language_model=sum(per_layer),
        lm_head=2 * logits * shapes.hidden * shapes.vocab_size,
        per_layer=per_layer,
        seq_lens=seq,
    )


def atp_scoring_flops(
    shapes: ModelShapes, backend: str, seq_len: int, first_vision: int, num_vision: int, weightings: int = 2,
    *, kernel_lse: bool = True,
) -> int:
    """Matmul FLOPs the ATP scores add at one pruning layer (one sample, no padding).

    ``eager``: the (H, L, L) probability map is summed over heads, then reduced with the (L, W)
    query weights: 2 L L W. ``fast``: for the R = L - first_vision rows from the first vision
    token on, logits against the V vision keys only when the fused kernel returns each row's
    log-sum-exp (``kernel_lse``, the CPU flash kernel), else against all L keys to form it:
    2 H R V h (or 2 H R L h); then the head-summed probabilities reduced with the weights:
    2 R V W. The threshold network's few thousand FLOPs are not included.
    """
    if backend == "eager":
        return 2 * seq_len * seq_len * weightings
    if backend == "fast":
        rows = seq_len - first_vision
        keys = num_vision if kernel_lse else seq_len
        return 2 * shapes.heads * rows * keys * shapes.head_dim + 2 * rows * num_vision * weightings
    raise ValueError(f"backend={backend!r} is not one of ('eager', 'fast')")


def measure_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **forward_kwargs: Any) -> int:
    """FLOPs counted by ``FlopCounterMode`` for one forward (matmul-like ops only)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs, **forward_kwargs)
    return int(counter.get_total_flops())
