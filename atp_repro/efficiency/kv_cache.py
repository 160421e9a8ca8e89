"""KV-cache storage of the vision tokens (supplementary Sec. 2.2), measured and analytic.

The supplementary reports "the full transformer activations on top of the vision tokens", i.e.
the keys and values that every decoder layer caches for the vision tokens, stored in bf16.
:func:`measure_kv_cache` reads them from the real ``DynamicCache`` a prefill returns (each
layer's key and value tensors, whose lengths differ after ATP pruning); :func:`analytic_kv_bytes`
computes the same number from the shapes and the kept-token schedule::

    bytes = sum over layers l of  vision_tokens(l) * 2 (K and V) * H_kv * head_dim * bytes_per_element
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .flops import ModelShapes

__all__ = ["KVCacheMeasurement", "measure_kv_cache", "analytic_kv_bytes", "cache_of"]


@dataclass(frozen=True)
class KVCacheMeasurement:
    """Bytes held by a prefill's KV cache (whole batch), per layer and in total."""

    layer_lengths: tuple[int, ...]  # cached positions per layer
    layer_bytes: tuple[int, ...]  # key + value bytes per layer (all positions)
    layer_vision_bytes: tuple[int, ...]  # key + value bytes of the vision positions per layer
    dtype: str

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes)

    @property
    def vision_bytes(self) -> int:
        return sum(self.layer_vision_bytes)


def cache_of(output) -> object:
    """The cache object of a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def measure_kv_cache(cache, prefix_tokens: int, prompt_tokens: int) -> KVCacheMeasurement:
    """Read the key/value tensors of every layer of a ``DynamicCache`` after a prefill.

    Args:
        cache: the ``DynamicCache`` of an unpadded batch ``[prefix][vision][prompt]`` right after
            prefill (ATP keeps this layout: kept vision tokens stay between the two text parts).
        prefix_tokens, prompt_tokens: text positions before and after the image (never pruned);
            the positions between them in each layer's cache are the vision tokens.
    """
    text_tokens = prefix_tokens + prompt_tokens
    layers = getattr(cache, "layers", None)
    if not layers:
        raise TypeError(f"expected a transformers DynamicCache with per-layer tensors, got {type(cache).__name__}")
    lengths, totals, vision, dtypes = [], [], [], set()
    for i, layer in enumerate(layers):
        keys, values = layer.keys, layer.values
        if keys is None or values is None:
            raise ValueError(f"cache layer {i} is empty: measure after a prefill with use_cache=True")
        length = keys.shape[-2]
        if length < text_tokens:
            raise ValueError(f"cache layer {i} holds {length} positions, fewer than text_tokens={text_tokens}")
        layer_bytes = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        vision_positions = torch.arange(prefix_tokens, length - prompt_tokens, device=keys.device)
        vision_bytes = (keys.index_select(-2, vision_positions).numel() * keys.element_size()
                        + values.index_select(-2, vision_positions).numel() * values.element_size())
        lengths.append(length)
        totals.append(layer_bytes)
        vision.append(vision_bytes)
        dtypes.add(str(keys.dtype).removeprefix("torch."))
    return KVCacheMeasurement(tuple(lengths), tuple(totals), tuple(vision), "/".join(sorted(dtypes)))


def analytic_kv_bytes(
    shapes: ModelShapes, vision_counts: Sequence[int] | None = None, *, dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
) -> int:
    """Key + value bytes of the vision tokens over all layers (``vision_counts``: per layer)."""
    counts = list(vision_counts) if vision_counts is not None else [shapes.num_vision] * shapes.num_layers
    if len(counts) != shapes.num_layers:
        raise ValueError(f"vision_counts has {len(counts)} entries; the model has {shapes.num_layers} layers")
    element = torch.empty((), dtype=dtype).element_size()
    return batch * sum(counts) * 2 * shapes.kv_heads * shapes.head_dim * element
