"""The mini world's second architecture: a small Qwen2-VL (supplementary Table 7's setting).

``Qwen2VLForConditionalGeneration`` built from config classes, with a Qwen2 decoder of the mini
LLaVA's size and M-RoPE: image tokens carry (temporal, row, column) positions and the text after an
image continues from the image's largest side, not from its token count. Inputs come as Qwen2-VL's
processor gives them (patches of half the mini LLaVA's side in 2 x 2 merge blocks, ``image_grid_thw``,
``mm_token_type_ids``), so the model's own M-RoPE and dynamic-resolution code runs unchanged.

Its vision slot (``model.model.visual``) holds the mini LLaVA's pretrained tower and projector,
reading the merge blocks as the tower's patches (:class:`MiniVisionSlot`). Qwen2-VL's own vision
transformer was tried first, distilled onto the mini LLaVA's image embeddings: 300 steps (113 s)
left 38% of the embeddings' variance unexplained and its upper bound read text at 1.4% (chance
1.8%; the mini LLaVA: 100%), so a second tower would have needed the mini world's full perception
pretraining again. ATP acts on the language model, where the architectures differ.

The decoder starts from the mini LLaVA upper bound's (same weights; the query/key/value biases Qwen2
adds start at zero; on text M-RoPE equals 1-D RoPE, so the copy is exact there) and is fine-tuned
with the projector on the VQA training split, where it learns M-RoPE's image positions. The result is
a cached artifact like every mini-world model (``atp_repro.mini.cache``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import numerics
from .cache import load_or_build, spec_hash
from .image_inputs import is_qwen, qwen_image_inputs
from .train import TrainConfig, train


@dataclass(frozen=True)
class QwenMiniConfig:
    """The upper bound's fine-tune (see the module docstring)."""

    ub_steps: int = 400
    ub_lr_lm: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.ub_steps, int) or self.ub_steps <= 0:
            raise ValueError(f"QwenMiniConfig.ub_steps must be a positive int, got {self.ub_steps!r}")
        if not self.ub_lr_lm > 0:
            raise ValueError(f"QwenMiniConfig.ub_lr_lm must be > 0, got {self.ub_lr_lm!r}")

    def replace(self, **changes) -> QwenMiniConfig:
        return dataclasses.replace(self, **changes)


MERGE, TEMPORAL = 2, 2  # Qwen2-VL's 2 x 2 merge blocks; a still image fills both temporal slots of a patch


class MiniVisionSlot(nn.Module):
    """Qwen2-VL's vision slot filled with the mini LLaVA's tower and projector.

    Takes what Qwen2-VL's vision transformer takes (patches flattened in merge-block order, and
    ``grid_thw``), rebuilds each image, and returns one token per merge block, row-major, as Qwen2-VL's
    patch merger does: the LLaVA tower's patch is exactly one merge block.
    """

    def __init__(self, llava, patch: int) -> None:
        super().__init__()
        self.tower = copy.deepcopy(llava.model.vision_tower)
        self.projector = copy.deepcopy(llava.model.multi_modal_projector)
        self.feature_layer = llava.config.vision_feature_layer
        self.patch, self.spatial_merge_size = patch, MERGE

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        p, m = self.patch, MERGE
        _, gh, gw = (int(v) for v in grid_thw[0])
        if not bool((grid_thw == grid_thw[0]).all()) or int(grid_thw[0, 0]) != 1:
            raise ValueError("the mini vision slot takes still images of one size; got image_grid_thw "
                             f"{grid_thw.tolist()}")
        x = hidden_states.reshape(-1, gh // m, gw // m, m, m, 3, TEMPORAL, p, p)[..., 0, :, :]  # first temporal slot
        images = x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(-1, 3, gh * p, gw * p)  # (B, C, H, W)
        hidden = self.tower(images, output_hidden_states=True).hidden_states[self.feature_layer][:, 1:]  # no CLS
        tokens = self.projector(hidden)  # (B, gh/m * gw/m, D), row-major
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=tokens.flatten(0, 1))


def qwen_mini_model(llava, qwen_cfg: QwenMiniConfig, tokenizer):
    """A mini Qwen2-VL with ``llava``'s decoder shape and a copy of its tower and projector in the vision slot
    (see the module docstring); the decoder's weights are fresh (:func:`copy_llava` copies them)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = llava.config.text_config
    if llava.config.vision_config.patch_size % MERGE:
        raise ValueError(f"the mini LLaVA's patch size {llava.config.vision_config.patch_size} must be even: the "
                         f"mini Qwen2-VL's patches have half that side, merged {MERGE} x {MERGE}")
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
        # the stock vision transformer is built (smallest size) and replaced by the mini vision slot
        vision_config=dict(depth=1, embed_dim=16, num_heads=1, hidden_size=text.hidden_size, patch_size=patch,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3),
        image_token_id=tokenizer.image_token_id,
        video_token_id=text.vocab_size,  # never in the input: the mini world has no videos
        vision_start_token_id=text.vocab_size, vision_end_token_id=text.vocab_size,
    )
    config._attn_implementation = llava.config._attn_implementation or "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(qwen_cfg.seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.model.visual = MiniVisionSlot(llava, patch)
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


@torch.no_grad()
def copy_llava(qwen, llava) -> None:
    """The mini LLaVA's decoder, embeddings and LM head into ``qwen`` (Qwen2's q/k/v biases set to zero); its
    vision slot already holds copies of the LLaVA's tower and projector (:func:`qwen_mini_model`)."""
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
            "qwen": dataclasses.asdict(qwen_cfg), "layout": "qwen2-vl-llava-vision-slot",
            "numerics": numerics.cache_key()}


def qwen_train_config(world, qwen_cfg: QwenMiniConfig) -> TrainConfig:
    """The mini LLaVA upper bound's training settings, shorter, at a fine-tune's LM rate: projector and
    decoder train, the tower stays frozen."""
    return world.train.replace(steps=qwen_cfg.ub_steps, lr_lm=qwen_cfg.ub_lr_lm, trainable="lm")


def qwen_upper_bound(world, qwen_cfg: QwenMiniConfig = QwenMiniConfig(), *, progress: bool = True):
    """The mini Qwen2-VL upper bound (cached): the mini LLaVA's weights, fine-tuned under M-RoPE."""
    from .runs import RunInfo, _finish, upper_bound

    spec = qwen_upper_bound_spec(world, qwen_cfg)
    llava, tok, _ = upper_bound(world, progress=progress)

    def build(folder: Path) -> dict:
        model = qwen_mini_model(llava, qwen_cfg, tok)
        copy_llava(model, llava)
        ds = world.dataset("train", tokenizer=tok, turns=world.ub_turns)
        res = train(model, ds, qwen_train_config(world, qwen_cfg), checkpoint_path=folder / "partial" / "checkpoint.pt",
                    run_spec=spec, progress=progress)
        return _finish(folder, model, tok, res, {})

    folder, manifest, status = load_or_build("qwen_upper_bound", spec, build)
    model = qwen_mini_model(llava, qwen_cfg, tok)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), tok, RunInfo("qwen_upper_bound", folder, status, manifest)
