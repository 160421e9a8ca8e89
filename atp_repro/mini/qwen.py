"""The mini world's second architecture: a small Qwen2-VL (supplementary Table 7's setting).

``Qwen2VLForConditionalGeneration`` built from config classes: Qwen2-VL's own vision transformer
(patches of half the mini LLaVA's side with 2-D rotary positions, then its 2 x 2 patch merger: at the
default grid a 96 px scene gives 24 x 24 patches of 4 px and 12 x 12 = 144 tokens, as many as the
mini LLaVA) and a Qwen2 decoder of the mini LLaVA's
size with M-RoPE. It is made from the mini LLaVA upper bound in two cheap stages instead of a second
perception pretraining and a second upper bound from scratch (which would cost about as much as
the first, 14 min):

1. **Vision distillation.** The Qwen2-VL tower and merger learn to reproduce, token for token, the
   mini LLaVA's image embeddings (its pretrained tower followed by its projector) on the
   perception-pretraining scenes (mean squared error). Qwen2-VL's own tower is likewise pretrained
   apart from the LLM.
2. **Upper bound.** The decoder starts from the mini LLaVA upper bound's decoder (same weights; the
   query/key/value biases Qwen2 adds start at zero) and is fine-tuned with the merger on the VQA
   training split, where it learns M-RoPE: vision tokens now carry (row, column) positions and the
   text after the image continues from the image's largest side, not from its token count.

Both stages are cached artifacts like every mini-world model (``atp_repro.mini.cache``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import numerics
from .cache import load_or_build, spec_hash
from .image_inputs import is_qwen, qwen_image_inputs
from .pretrain import scene_targets
from .train import TrainConfig, cosine_with_warmup, train


@dataclass(frozen=True)
class QwenMiniConfig:
    """Sizes and the two cheap training stages (see the module docstring)."""

    # Two blocks, not the mini LLaVA tower's three: at 576 patches per scene (patch side halved, merged
    # 2 x 2 after the tower) a block costs about 4x a mini-LLaVA block (0.32 s per training step of 32
    # scenes, measured, pinned fp32).
    vision_depth: int = 2
    vision_embed: int = 96
    vision_heads: int = 4
    distill_steps: int = 300
    distill_batch: int = 16
    distill_lr: float = 2e-3
    ub_steps: int = 400
    ub_lr_lm: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vision_depth", "vision_embed", "vision_heads", "distill_steps", "distill_batch", "ub_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"QwenMiniConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.vision_embed % self.vision_heads:
            raise ValueError(f"QwenMiniConfig.vision_embed={self.vision_embed} must be divisible by "
                             f"vision_heads={self.vision_heads}")
        for name in ("distill_lr", "ub_lr_lm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"QwenMiniConfig.{name} must be > 0, got {getattr(self, name)!r}")

    def replace(self, **changes) -> QwenMiniConfig:
        return dataclasses.replace(self, **changes)


MERGE, TEMPORAL = 2, 2  # Qwen2-VL's 2 x 2 patch merger; a still image fills both temporal slots


def qwen_mini_model(llava, qwen_cfg: QwenMiniConfig, tokenizer):
    """A freshly initialised mini Qwen2-VL with ``llava``'s number of image tokens (patches of half the side,
    merged 2 x 2) and a decoder of its shape (weights not copied)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = llava.config.text_config
    if llava.config.vision_config.patch_size % MERGE:
        raise ValueError(f"the mini LLaVA's patch size {llava.config.vision_config.patch_size} must be even: the "
                         f"mini Qwen2-VL uses patches of half that side, merged {MERGE} x {MERGE}")
    patch = llava.config.vision_config.patch_size // MERGE
    head_dim = text.hidden_size // text.num_attention_heads
    pairs = head_dim // 2
    # Qwen2-VL's split of the frequency pairs (16, 24, 24 of 64): a quarter temporal, 3/8 height, 3/8 width
    section = [pairs // 4, (pairs - pairs // 4) // 2, pairs - pairs // 4 - (pairs - pairs // 4) // 2]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                         intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                         num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                         max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
                         bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                         pad_token_id=text.pad_token_id, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}),
        vision_config=dict(depth=qwen_cfg.vision_depth, embed_dim=qwen_cfg.vision_embed,
                           num_heads=qwen_cfg.vision_heads, hidden_size=text.hidden_size, patch_size=patch,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3),
        image_token_id=tokenizer.image_token_id,
        video_token_id=text.vocab_size,  # never in the input: the mini world has no videos
        vision_start_token_id=text.vocab_size, vision_end_token_id=text.vocab_size,
    )
    config._attn_implementation = llava.config._attn_implementation or "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(qwen_cfg.seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation(config._attn_implementation)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "suppress_tokens"):
        setattr(model.generation_config, name, getattr(llava.generation_config, name))
    return model.eval()


def image_embeddings(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, D) image tokens as the decoder receives them, for either architecture (raster order)."""
    batch = pixel_values.shape[0]
    if is_qwen(model):
        inputs = qwen_image_inputs(pixel_values, torch.zeros(batch, 1, dtype=torch.long), model.config)
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        return torch.stack(list(features))
    return torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))


def distill_vision(qwen, llava, world, qwen_cfg: QwenMiniConfig, *, progress: bool = True) -> dict:
    """Stage 1: the Qwen2-VL tower + merger regress the mini LLaVA's image embeddings (MSE)."""
    torch.set_num_threads(world.pretrain.num_threads)
    visual = qwen.model.visual
    params = list(visual.parameters())
    opt = torch.optim.AdamW(params, lr=qwen_cfg.distill_lr, weight_decay=0.0)
    warm = max(1, round(0.03 * qwen_cfg.distill_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, qwen_cfg.distill_steps, warm))
    visual.train()
    losses, wall = [], 0.0
    for step in tqdm(range(qwen_cfg.distill_steps), disable=not progress, desc="distill vision"):
        t0 = time.perf_counter()
        first = step * qwen_cfg.distill_batch
        pixels = torch.stack([scene_targets(first + i, world.grid, world.scene, world.world_seed)[0]
                              for i in range(qwen_cfg.distill_batch)])
        with torch.no_grad():
            target = image_embeddings(llava, pixels)
        loss = torch.nn.functional.mse_loss(image_embeddings(qwen, pixels), target) / target.pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        wall += time.perf_counter() - t0
    visual.eval()
    return {"distill_wall_time_s": wall, "distill_losses": losses}


@torch.no_grad()
def copy_decoder(qwen, llava) -> None:
    """The decoder, embeddings and LM head of ``llava`` into ``qwen`` (Qwen2's q/k/v biases set to zero)."""
    source = llava.model.language_model.state_dict()
    target = qwen.model.language_model
    missing, unexpected = target.load_state_dict(source, strict=False)
    if unexpected or any(not name.endswith("_proj.bias") for name in missing):
        raise RuntimeError(f"decoder layouts differ: missing {missing}, unexpected {unexpected}")
    for name in missing:
        target.get_parameter(name).zero_()
    qwen.lm_head.weight.copy_(llava.lm_head.weight)


def qwen_upper_bound_spec(world, qwen_cfg: QwenMiniConfig) -> dict:
    from .runs import upper_bound_spec

    return {"kind": "qwen_upper_bound", "parent": spec_hash(upper_bound_spec(world)),
            "qwen": dataclasses.asdict(qwen_cfg), "layout": "qwen2-vl-half-patch-merge2",
            "numerics": numerics.cache_key()}


def qwen_train_config(world, qwen_cfg: QwenMiniConfig) -> TrainConfig:
    """Stage 2: the upper bound's own training settings, shorter, at a fine-tune's LM rate; the merger and
    the decoder train, the tower stays as distilled."""
    return world.train.replace(steps=qwen_cfg.ub_steps, lr_lm=qwen_cfg.ub_lr_lm, trainable="lm")


def qwen_upper_bound(world, qwen_cfg: QwenMiniConfig = QwenMiniConfig(), *, progress: bool = True):
    """The mini Qwen2-VL upper bound (cached): distilled vision, decoder from the mini LLaVA, fine-tuned."""
    from .runs import RunInfo, _finish, upper_bound

    spec = qwen_upper_bound_spec(world, qwen_cfg)
    llava, tok, _ = upper_bound(world, progress=progress)

    def build(folder: Path) -> dict:
        model = qwen_mini_model(llava, qwen_cfg, tok)
        distilled = distill_vision(model, llava, world, qwen_cfg, progress=progress)
        copy_decoder(model, llava)
        ds = world.dataset("train", tokenizer=tok, turns=world.ub_turns)
        res = train(model, ds, qwen_train_config(world, qwen_cfg), checkpoint_path=folder / "partial" / "checkpoint.pt",
                    run_spec=spec, progress=progress)
        return _finish(folder, model, tok, res, {**distilled, "finetune_wall_time_s": res.wall_time_s,
                                                 "wall_time_s": res.wall_time_s + distilled["distill_wall_time_s"]})

    folder, manifest, status = load_or_build("qwen_upper_bound", spec, build)
    model = qwen_mini_model(llava, qwen_cfg, tok)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    shutil.rmtree(folder / "partial", ignore_errors=True)
    return model.eval(), tok, RunInfo("qwen_upper_bound", folder, status, manifest)
