"""The timing model: LLaVA-1.5-7B's depth and ATP positions at a width that fits a CPU.

LLaVA-1.5-7B's language model has 32 decoder layers (width 4096, 32 heads of 128, SwiGLU 11008)
and the paper places ATP modules after layers 4, 14 and 24 (0-based). Its prefill sees 576 vision
tokens (24 x 24 CLIP-L/14 patches of a 336 px image) among about 64 text tokens.
:class:`TimingModelConfig` keeps the depth, the module positions, the head dimension (128), the
FFN ratio, the vision grid and the text length, and shrinks only the widths (``cpu`` preset).
Weights are random: prefill time depends on shapes, not on values.

:func:`solve_fixed_keep` turns a target *average* number of vision tokens over all decoder layers
(the paper's "Token" definition, 144 or 88) into per-module kept counts for ``ATPConfig.fixed_keep``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from atp_repro.atp.config import PAPER_MODULE_LAYERS, PAPER_NUM_LAYERS

__all__ = [
    "TimingModelConfig",
    "PRESETS",
    "timing_model_config",
    "build_timing_model",
    "timing_inputs",
    "layer_vision_counts",
    "average_vision_tokens",
    "min_average_tokens",
    "solve_fixed_keep",
]

IMAGE_TOKEN_ID = 4
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"TimingModelConfig.{name}={value!r} is invalid: expected {allowed}.")


@dataclass(frozen=True)
class TimingModelConfig:
    """Shapes of a random-weight LLaVA used to time prefill.

    Attributes:
        name: preset name (recorded in result rows).
        num_layers: decoder layers (LLaVA-1.5-7B: 32).
        module_layers: 0-based layers after which an ATP module runs (paper: 4, 14, 24).
        hidden, heads, kv_heads, ffn: decoder width, attention heads, key/value heads (GQA when
            fewer than ``heads``) and SwiGLU width.
        vocab_size: vocabulary (LLaVA-1.5: 32064); prefill computes logits of the last token only.
        vision_hidden, vision_heads, vision_ffn, vision_layers: CLIP vision tower shapes.
        image_size, patch_size: image side and patch side; (image_size / patch_size)^2 vision tokens
            per tile.
        tiles: image tiles per sample, each encoded by the vision tower on its own (LLaVA-NeXT-style
            crops: 5 tiles of 24 x 24 = 2880 vision tokens); 1 = LLaVA-1.5.
        prefix_tokens: text tokens before the image (BOS + system prompt + ``USER:``).
        prompt_tokens: text tokens after the image (the question and ``ASSISTANT:``).
        seed: weight and input seed.
    """

    name: str = "cpu"
    num_layers: int = PAPER_NUM_LAYERS
    module_layers: tuple[int, ...] = PAPER_MODULE_LAYERS
    hidden: int = 384
    heads: int = 3
    kv_heads: int = 3
    ffn: int = 1032
    vocab_size: int = 32064
    vision_hidden: int = 192
    vision_heads: int = 3
    vision_ffn: int = 768
    vision_layers: int = 6
    image_size: int = 336
    patch_size: int = 14
    tiles: int = 1
    prefix_tokens: int = 32
    prompt_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.module_layers, list):
            object.__setattr__(self, "module_layers", tuple(self.module_layers))
        for name in ("num_layers", "hidden", "heads", "kv_heads", "ffn", "vocab_size", "vision_hidden",
                     "vision_heads", "vision_ffn", "vision_layers", "image_size", "patch_size", "tiles",
                     "prompt_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "an int >= 1")
        if not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 1:
            _fail("prefix_tokens", self.prefix_tokens, "an int >= 1 (the BOS token is part of the prefix)")
        layers = self.module_layers
        if not layers or any(not isinstance(x, int) or x < 0 for x in layers) or list(layers) != sorted(set(layers)):
            _fail("module_layers", layers, "a non-empty, strictly increasing tuple of non-negative ints")
        if layers[-1] > self.num_layers - 2:
            _fail("module_layers", layers, f"layers in 0..{self.num_layers - 2} (num_layers={self.num_layers})")
        if self.hidden % self.heads:
            _fail("heads", self.heads, f"a divisor of hidden={self.hidden}")
        if self.heads % self.kv_heads:
            _fail("kv_heads", self.kv_heads, f"a divisor of heads={self.heads}")
        if self.vision_hidden % self.vision_heads:
            _fail("vision_heads", self.vision_heads, f"a divisor of vision_hidden={self.vision_hidden}")
        if self.image_size % self.patch_size:
            _fail("patch_size", self.patch_size, f"a divisor of image_size={self.image_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_vision(self) -> int:
        return self.tiles * self.grid * self.grid

    @property
    def text_tokens(self) -> int:
        return self.prefix_tokens + self.prompt_tokens

    @property
    def seq_len(self) -> int:
        return self.text_tokens + self.num_vision

    def replace(self, **changes: Any) -> TimingModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, TimingModelConfig] = {
    # LLaVA-1.5-7B's real shapes (random weights): GPUs, or CPUs with time to spare (~14 GB in bf16).
    "llava-1.5-7b": TimingModelConfig(name="llava-1.5-7b", hidden=4096, heads=32, kv_heads=32, ffn=11008,
                                      vision_hidden=1024, vision_heads=16, vision_ffn=4096, vision_layers=24),
    # Default on the 2-core CPU: width / 10.7 (head_dim 128 and the FFN ratio kept), 32 layers, 576 vision +
    # 64 text tokens; the vision tower is ~5% of prefill FLOPs as in LLaVA-1.5-7B.
    "cpu": TimingModelConfig(name="cpu"),
    # Twice as wide (head_dim 128, FFN ratio and the ~5% vision share kept): the ATP modules' own time
    # scales like 1 / width against the layers', so their overhead fraction is read closer to 7B here
    # (fast scoring: 2.8% of the pruned prefill at width 384, 1.2% at 768; measured).
    "cpu-wide": TimingModelConfig(name="cpu-wide", hidden=768, heads=6, kv_heads=6, ffn=2064,
                                  vision_hidden=384, vision_heads=6, vision_ffn=1536),
    # Smoke tests: same depth, positions, grid and text; narrow.
    "smoke": TimingModelConfig(name="smoke", hidden=256, heads=2, kv_heads=2, ffn=688, vocab_size=1024,
                               vision_hidden=64, vision_heads=2, vision_ffn=128, vision_layers=2),
}


def timing_model_config(preset: str = "cpu", **changes: Any) -> TimingModelConfig:
    """A preset (``cpu``, ``smoke``, ``llava-1.5-7b``), optionally with changed fields."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
    return PRESETS[preset].replace(**changes) if changes else PRESETS[preset]


def llava_config(cfg: TimingModelConfig, attn_implementation: str = "sdpa") -> LlavaConfig:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_ffn,
                                       num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                       image_size=cfg.image_size, patch_size=cfg.patch_size),
        text_config=LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.heads,
                                num_key_value_heads=cfg.kv_heads, bos_token_id=BOS_TOKEN_ID, eos_token_id=2,
                                pad_token_id=PAD_TOKEN_ID, max_position_embeddings=max(4096, cfg.seq_len)),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=cfg.num_vision,  # all tiles
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    return config


def build_timing_model(
    cfg: TimingModelConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> LlavaForConditionalGeneration:
    """A random-weight ``LlavaForConditionalGeneration`` of these shapes, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(llava_config(cfg, attn_implementation))
    model.set_attn_implementation(attn_implementation)
    return model.to(device=device, dtype=dtype).eval()


def timing_inputs(
    cfg: TimingModelConfig,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """``[BOS prefix][tiles x 576 image tokens][prompt]`` ids and random pixels (one image per tile), no padding."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    low = IMAGE_TOKEN_ID + 1
    prefix = torch.randint(low, cfg.vocab_size, (batch, cfg.prefix_tokens - 1), generator=generator)
    prompt = torch.randint(low, cfg.vocab_size, (batch, cfg.prompt_tokens), generator=generator)
    input_ids = torch.cat([torch.full((batch, 1), BOS_TOKEN_ID), prefix,
                           torch.full((batch, cfg.num_vision), IMAGE_TOKEN_ID), prompt], dim=1)
    pixel_values = torch.randn(batch * cfg.tiles, 3, cfg.image_size, cfg.image_size, generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixel_values.to(device=device, dtype=dtype)}


# --------------------------------------------------------------------------------------------
# Kept-token schedules
# --------------------------------------------------------------------------------------------


def layer_vision_counts(
    fixed_keep: tuple[int, ...] | None, module_layers: tuple[int, ...], num_layers: int, num_vision: int
) -> list[int]:
    """Vision tokens entering each decoder layer when module m keeps ``fixed_keep[m]`` tokens.

    A module after layer l changes the count from layer l + 1 on; ``None`` = no pruning.
    """
    counts = [num_vision] * num_layers
    if fixed_keep is None:
        return counts
    if len(fixed_keep) != len(module_layers):
        raise ValueError(f"fixed_keep={fixed_keep} needs one count per module ({len(module_layers)} modules)")
    current = num_vision
    for (layer, keep) in zip(module_layers, fixed_keep):
        current = min(current, keep)
        for i in range(layer + 1, num_layers):
            counts[i] = current
    return counts


def average_vision_tokens(
    fixed_keep: tuple[int, ...] | None, module_layers: tuple[int, ...], num_layers: int, num_vision: int
) -> float:
    """The paper's "Token": vision tokens averaged over all decoder layers."""
    return sum(layer_vision_counts(fixed_keep, module_layers, num_layers, num_vision)) / num_layers


def min_average_tokens(module_layers: tuple[int, ...], num_layers: int, num_vision: int) -> float:
    """Smallest reachable average: every layer up to the first module sees all vision tokens."""
    return (module_layers[0] + 1) * num_vision / num_layers


def solve_fixed_keep(
    target_average: float,
    *,
    module_layers: tuple[int, ...] = PAPER_MODULE_LAYERS,
    num_layers: int = PAPER_NUM_LAYERS,
    num_vision: int = 576,
    search_radius: int = 12,
) -> tuple[int, ...]:
    """Per-module kept counts (for ``ATPConfig.fixed_keep``) whose all-layer average is exact.

    The schedule is geometric, k_m = N0 * r^(m + 1), with the ratio r solved (bisection) so that
    the average over all ``num_layers`` decoder layers equals ``target_average``; the counts are
    then made integers, non-increasing, with the *exact* average when one exists within
    ``search_radius`` of the real-valued solution (the closest such schedule is returned).

    >>> solve_fixed_keep(144)
    (137, 33, 4)
    >>> sum([576] * 5 + [137] * 10 + [33] * 10 + [4] * 7) / 32
    144.0

    Raises:
        ValueError: if the target is outside the reachable range, e.g. 88 with a module after
            layer 4 of 32: layers 0-4 alone average 5 * 576 / 32 = 90 tokens.
    """
    if not isinstance(num_vision, int) or num_vision < 1:
        raise ValueError(f"num_vision={num_vision!r} is invalid: expected an int >= 1")
    if not module_layers or list(module_layers) != sorted(set(module_layers)) or module_layers[-1] > num_layers - 2:
        raise ValueError(f"module_layers={module_layers} is invalid: expected strictly increasing layers in "
                         f"0..{num_layers - 2}")
    lowest = min_average_tokens(module_layers, num_layers, num_vision)
    if not (isinstance(target_average, (int, float)) and lowest <= target_average <= num_vision):
        raise ValueError(
            f"target_average={target_average!r} is not reachable with module_layers={module_layers} of "
            f"{num_layers} layers and {num_vision} vision tokens: expected a value in [{lowest:g}, {num_vision}] "
            f"(layers 0..{module_layers[0]} always see all {num_vision} tokens)")
    # Layers governed by module m: from module_layers[m] + 1 to the next module (inclusive) or the end.
    bounds = list(module_layers[1:]) + [num_layers - 1]
    spans = [b - a for a, b in zip(module_layers, bounds)]
    budget = target_average * num_layers - (module_layers[0] + 1) * num_vision  # token-layers after module 0

    def total(r: float) -> float:
        return sum(s * num_vision * r ** (m + 1) for m, s in enumerate(spans))

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < budget else (lo, mid)
    real = [num_vision * lo ** (m + 1) for m in range(len(spans))]
    target = round(target_average * num_layers)
    if not math.isclose(target, target_average * num_layers, abs_tol=1e-9):
        raise ValueError(f"target_average={target_average!r} times num_layers={num_layers} is not an integer number "
                         "of token-layers; no integer schedule has exactly this average")
    best: tuple[float, tuple[int, ...]] | None = None
    base = [int(round(x)) for x in real]
    for deltas in itertools.product(range(-search_radius, search_radius + 1), repeat=len(base)):
        counts = tuple(b + d for b, d in zip(base, deltas))
        if any(c < 0 or c > num_vision for c in counts) or any(b > a for a, b in zip(counts, counts[1:])):
            continue
        if sum(layer_vision_counts(counts, module_layers, num_layers, num_vision)) != target:
            continue
        distance = sum((c - x) ** 2 for c, x in zip(counts, real))
        if best is None or distance < best[0]:
            best = (distance, counts)
    if best is None:
        raise ValueError(f"no integer schedule with average exactly {target_average} within search_radius="
                         f"{search_radius} of the geometric solution {[round(x, 2) for x in real]}")
    return best[1]
