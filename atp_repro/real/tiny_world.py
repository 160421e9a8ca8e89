"""A complete real-scale setup in miniature: a tiny random VLM folder, LLaVA-format data, a config.

The real path (HF Trainer, DeepSpeed ZeRO-3, checkpoints, resume, reload) is exercised on a CPU with
the same classes and file layouts as LLaVA-1.5-7B (``variant="llava"``) or Qwen2-VL-7B-Instruct
(``"qwen2_vl"``; ``"qwen2_5_vl"`` for Qwen2.5-VL), only smaller::

    python -m atp_repro.real.tiny_world /tmp/tiny [qwen2_vl]  # writes model/, images/, data.json, config.yaml
    torchrun --nproc_per_node 2 -m atp_repro train --config /tmp/tiny/config.yaml

The data asks for the colour of a plain image (four colours), plus one text-only sample, so that
the loss has something to learn and mixed batches occur. The Qwen2-VL variant's images have
different non-square sizes (dynamic resolution: each its own grid and token count), its processor
has a ChatML chat template in the layout of Qwen2-VL-Instruct's and its config trains with the LM
frozen (supplementary Table 7's setting) by default.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from PIL import Image

from .. import paths
from ..atp.tiny import (
    PAD_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
    tiny_llava,
    tiny_processor,
    tiny_qwen2_vl,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 20)}
WORDS = ("what", "colour", "is", "the", "image", "?", "say", "hello", *COLOURS)
GRID = 4  # 4 x 4 vision tokens
LAYERS = 4
VARIANTS = ("llava", "qwen2_vl", "qwen2_5_vl")

# Qwen2-VL variant: (width, height) of the images, in turn; patch 2, merge 2 -> (h / 4) x (w / 4) tokens
# (15, 18, 28, 8, 30 and 8 tokens after the processor's resize to multiples of 4)
QWEN_IMAGE_SIZES = ((20, 12), (12, 24), (28, 16), (16, 8), (24, 20), (8, 16))
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 8 * 8, 32 * 32
QWEN_SYSTEM = "you are a helpful assistant"
# ChatML as Qwen2-VL-Instruct's template lays it out: a default system turn, the image as
# <|vision_start|><|image_pad|><|vision_end|> before the text, <|im_end|> and a newline after each turn
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# id -> token where the tiny Qwen2-VL's config fixes the id (pad 0, eos 2, image, video, vision start and end)
QWEN_SPECIAL = {PAD_TOKEN_ID: "<|endoftext|>", 1: "<unk>", 2: "<|im_end|>", 3: "<|im_start|>",
                QWEN_IMAGE_TOKEN_ID: "<|image_pad|>", QWEN_VIDEO_TOKEN_ID: "<|video_pad|>",
                QWEN_VISION_START_ID: "<|vision_start|>", QWEN_VISION_END_ID: "<|vision_end|>"}


def tiny_qwen2_vl_processor(model, words: tuple[str, ...] = ()):
    """An offline Qwen2-VL processor for :func:`atp_repro.atp.tiny.tiny_qwen2_vl` (its class for Qwen2.5-VL):
    a whitespace word-level tokenizer with Qwen2-VL's special tokens at the model's ids, no BOS (as Qwen2's),
    ``<|im_end|>`` as end of sequence, then ``system``/``user``/``assistant``, ``words`` and fillers up to the
    vocabulary size; the dynamic-resolution image processor at the model's patch and merge sizes; and
    :data:`QWEN_CHAT_TEMPLATE`. It has no video processor (see :mod:`atp_repro.real.processors`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    from .processors import IMAGE_ONLY_PROCESSORS

    vocab_size = model.config.text_config.vocab_size
    special = [QWEN_SPECIAL[i] for i in range(len(QWEN_SPECIAL))]
    vocab = list(dict.fromkeys((*special, "system", "user", "assistant", *QWEN_SYSTEM.split(), *words)))
    if len(vocab) > vocab_size:
        raise ValueError(f"words: {len(vocab)} distinct tokens do not fit the model's vocabulary of {vocab_size}")
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|im_start|>"])  # "<|im_start|>user" is split there, as Qwen2's tokenizer does
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    vision = model.config.vision_config
    image_processor = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                               temporal_patch_size=vision.temporal_patch_size,
                                               min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    return IMAGE_ONLY_PROCESSORS[model.config.model_type](image_processor=image_processor, tokenizer=tokenizer,
                                                         chat_template=QWEN_CHAT_TEMPLATE)


def tiny_config(root: Path, *, world_size: int = 2, zero_stage: int = 3, freeze_llm: bool | None = None,
                save_steps: int = 2, gradient_checkpointing: bool = False, variant: str = "llava") -> dict:
    """The config mapping of a tiny run (the real config's structure; values scaled to the tiny model).

    ``freeze_llm``: default False for LLaVA, True for the Qwen2-VL variants (Table 7's setting)."""
    _check_variant(variant)
    qwen = variant != "llava"
    freeze_llm = qwen if freeze_llm is None else freeze_llm
    name = "LLaVA" if not qwen else {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}[variant]
    return {
        "name": "tiny-real" if not qwen else f"tiny-real-{variant}", "scale": "real",
        "description": f"tiny random {name} trained through the real-scale path (CPU test)",
        "model": {"name_or_path": str(root / "model"), "num_hidden_layers": LAYERS,
                  "vision_grid": None if qwen else GRID},  # null: dynamic resolution
        "training": {
            "global_batch_size": 4, "per_device_batch_size": 1, "gradient_accumulation_steps": 4 // world_size,
            "world_size": world_size, "lr_llm": 1.0e-3, "lr_atp": 1.0e-2, "lr_scheduler": "cosine",
            "warmup_ratio": 0.03, "epochs": 1, "weight_decay": 0.0, "optimizer": "adamw", "max_grad_norm": 1.0,
            "precision": "fp32", "deepspeed_zero_stage": zero_stage,
            "deepspeed_config": str(paths.configs_dir() / "deepspeed" / "zero3.json") if zero_stage else None,
            "freeze_llm": freeze_llm, "seed": 0,
        },
        "atp": {"module_layers": [1], "n_target": 8.0, "lambda_atp": 0.1, "lambda_target": 0.2,
                "temperature": 1.0e6, "ste_temperature": 3.0, "score_gradient": not freeze_llm,
                "lambda_sample": 2.0, "grid_strides": [2],
                "score_normalisation": "minmax", "position_encoding": "original" if qwen else "learned2d",
                "init_calibration": "none"},
        "data": {"train_json": str(root / "data.json"), "image_folder": str(root / "images"),
                 "max_length": 128 if qwen else 64,
                 **({"image_aspect_ratio": "native", "conversation_template": "processor"} if qwen else {})},
        "run": {"output_dir": str(root / "out"), "save_steps": save_steps, "logging_steps": 1,
                "dataloader_num_workers": 0, "gradient_checkpointing": gradient_checkpointing},
    }


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def tiny_model_and_processor(variant: str = "llava"):
    """The tiny random model of a variant and its offline processor (what :func:`write_tiny_world` saves)."""
    _check_variant(variant)
    if variant == "llava":
        model = tiny_llava(num_layers=LAYERS, grid=GRID)
        return model, tiny_processor(model, words=WORDS)
    model = tiny_qwen2_vl(num_layers=LAYERS, version="2" if variant == "qwen2_vl" else "2.5")
    return model, tiny_qwen2_vl_processor(model, words=WORDS)


def image_size(variant: str, i: int) -> tuple[int, int]:
    """(width, height) of the ``i``-th image: LLaVA's vary in width (padded to a square); Qwen2-VL's in width,
    height and aspect ratio (see :data:`QWEN_IMAGE_SIZES`)."""
    return (20 + i, 16) if variant == "llava" else QWEN_IMAGE_SIZES[i % len(QWEN_IMAGE_SIZES)]


def write_tiny_world(root: str | Path, *, samples: int = 16, variant: str = "llava", **config) -> Path:
    """Write ``model/``, ``images/``, ``data.json`` (``samples`` image questions and one text-only
    sample) and ``config.yaml`` under ``root``; return the config path. ``variant``: one of
    :data:`VARIANTS`; ``config``: see :func:`tiny_config`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    model, processor = tiny_model_and_processor(variant)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    names = list(COLOURS)
    data = []
    for i in range(samples):
        colour = names[i % len(names)]
        Image.new("RGB", image_size(variant, i), COLOURS[colour]).save(root / "images" / f"{i}.png")
        data.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "what colour is the image ?\n<image>"}, {"from": "gpt", "value": colour}]})
    data.insert(min(3, len(data)), {"id": "text0", "conversations": [
        {"from": "human", "value": "say hello"}, {"from": "gpt", "value": "hello"}]})
    (root / "data.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root, variant=variant, **config), sort_keys=False), encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(f"usage: python -m atp_repro.real.tiny_world <folder> [{' | '.join(VARIANTS)}]")
    print(write_tiny_world(sys.argv[1], variant=sys.argv[2] if len(sys.argv) == 3 else "llava"))
