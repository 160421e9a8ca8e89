"""A small LLaVA built from Hugging Face config classes (no weights are downloaded).

CLIP vision tower -> 2-layer MLP projector -> Llama decoder, i.e. ``LlavaForConditionalGeneration``
exactly as LLaVA-1.5 is assembled, only smaller. The vision grid is ``image_size // patch_size``:
with the default 96 px scenes, patch 12 gives the mini world's 8x8 = 64 tokens (``configs/mini_world.yaml``),
patch 8 gives 12x12 = 144 (this class's default) and patch 4 gives LLaVA-1.5's 24x24 = 576.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class MiniModelConfig:
    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    vision_ffn: int = 384
    lm_hidden: int = 128
    lm_layers: int = 8
    lm_heads: int = 4
    lm_ffn: int = 352
    max_position_embeddings: int = 1024
    init_std: float = 0.08  # initializer_range of the Llama decoder, ~1/sqrt(lm_hidden). Chosen over the HF
    # default 0.02 before the residual init and the balanced tower loss existed; not re-measured since.
    # GPT-2's residual init (as in nanoGPT): the output projections of attention and MLP start at
    # init_std / sqrt(2 * lm_layers). With the plain init the 8 random layers swamp the small text
    # residual, and the decoder never learns even a fixed lookup ("what does the text say ?": answer
    # tokens stayed at chance for 300 steps) while a 2-layer one learns it in 150 (measured).
    scale_residual_init: bool = True
    attn_implementation: str = "sdpa"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"MiniModelConfig.patch_size must divide image_size, got patch_size={self.patch_size}, "
                f"image_size={self.image_size}"
            )
        if self.lm_layers < 8:
            raise ValueError(f"MiniModelConfig.lm_layers must be >= 8 (three ATP modules), got {self.lm_layers}")
        for name in ("vision_hidden", "lm_hidden"):
            heads = self.vision_heads if name.startswith("vision") else self.lm_heads
            if getattr(self, name) % heads:
                raise ValueError(f"MiniModelConfig.{name} must be divisible by its head count {heads}")
        if not 0 < self.init_std <= 1:
            raise ValueError(f"MiniModelConfig.init_std must be in (0, 1], got {self.init_std}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"MiniModelConfig.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                f"got {self.attn_implementation!r}"
            )
        if self.n_image_tokens + 64 > self.max_position_embeddings:
            raise ValueError(
                f"MiniModelConfig.max_position_embeddings={self.max_position_embeddings} is too small "
                f"for {self.n_image_tokens} image tokens"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        return self.grid * self.grid

    def replace(self, **changes) -> MiniModelConfig:
        return dataclasses.replace(self, **changes)


def llava_config(cfg: MiniModelConfig, vocab_size: int, image_token_id: int, pad_id: int = 0,
                 bos_id: int = 1, eos_id: int = 2) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_ffn,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.lm_hidden,
        intermediate_size=cfg.lm_ffn,
        num_hidden_layers=cfg.lm_layers,
        num_attention_heads=cfg.lm_heads,
        num_key_value_heads=cfg.lm_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=cfg.init_std,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=cfg.n_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def build_model(cfg: MiniModelConfig, tokenizer) -> LlavaForConditionalGeneration:
    """A freshly initialised mini LLaVA; weights are a deterministic function of ``cfg.seed``."""
    lc = llava_config(
        cfg,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.image_token_id,
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    lc._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(lc)
    if cfg.scale_residual_init:
        scale_residual_projections(model, cfg.lm_layers)
    model.set_attn_implementation(cfg.attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # <image> is a placeholder for vision features, never an answer: an untrained model may still
    # emit it, and a decode step holding an image token would be taken for a second image.
    model.generation_config.suppress_tokens = [tokenizer.image_token_id]
    return model


@torch.no_grad()
def scale_residual_projections(model: LlavaForConditionalGeneration, n_layers: int) -> None:
    """Shrink the decoder's residual-branch output weights (``o_proj``, ``down_proj``) by 1/sqrt(2 L)."""
    factor = (2 * n_layers) ** -0.5
    for layer in model.model.language_model.layers:
        layer.self_attn.o_proj.weight.mul_(factor)
        layer.mlp.down_proj.weight.mul_(factor)


def vision_tower_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The vision encoder without its projector: LLaVA's ``vision_tower``; the mini Qwen2-VL's vision slot's
    tower (:class:`atp_repro.mini.qwen.MiniVisionSlot`)."""
    inner = model.model
    return list((inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual.tower).parameters())


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    inner = model.model
    projector = inner.multi_modal_projector if hasattr(inner, "multi_modal_projector") else inner.visual.projector
    return {
        "vision_tower": sum(p.numel() for p in vision_tower_parameters(model)),
        "projector": sum(p.numel() for p in projector.parameters()),
        "language_model": sum(p.numel() for p in inner.language_model.parameters())
        + sum(p.numel() for p in model.lm_head.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }
