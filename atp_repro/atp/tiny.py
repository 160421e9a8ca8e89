"""Tiny random-weight LLaVA models built from config classes (tests, examples, timing shapes).

Nothing is downloaded: the model is ``LlavaForConditionalGeneration`` with a small CLIP vision
tower and a small Llama decoder, and inputs are random token ids around a contiguous image span.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 4
PAD_TOKEN_ID = 0
VOCAB_SIZE = 128


def tiny_llava(
    num_layers: int = 6,
    grid: int = 8,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A random LLaVA with a ``grid`` x ``grid`` vision grid (patch 4) and ``num_layers`` decoder layers."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=grid * 4, patch_size=4),
        text_config=LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=num_layers, num_attention_heads=heads,
                                num_key_value_heads=kv_heads or heads, bos_token_id=1, eos_token_id=2,
                                pad_token_id=PAD_TOKEN_ID, max_position_embeddings=1024),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=grid * grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config).eval()
    # Random weights give near-uniform attention; sharpen it so that scores differ between tokens.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token rows -> left-padded ``(input_ids, attention_mask)``, each (B, longest row)."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = row
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


def tiny_inputs(
    model: LlavaForConditionalGeneration,
    prefix_lengths: tuple[int, ...] = (3,),
    prompt_lengths: tuple[int, ...] = (6,),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A left-padded batch: [pad][bos prefix][image span][prompt] per sample, with pixel values."""
    generator = torch.Generator().manual_seed(seed)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    num_vision = grid * grid
    rows = []
    for prefix, prompt in zip(prefix_lengths, prompt_lengths):
        text = torch.randint(5, VOCAB_SIZE, (prefix + prompt,), generator=generator)
        rows.append(torch.cat([torch.tensor([1]), text[: prefix - 1], torch.full((num_vision,), IMAGE_TOKEN_ID),
                               text[prefix - 1:]]))
    input_ids, attention_mask = left_pad(rows)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(len(rows), 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def single_inputs(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a left-padded batch from :func:`tiny_inputs`, without its padding (batch of 1)."""
    keep = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i : i + 1, keep],
            "attention_mask": batch["attention_mask"][i : i + 1, keep],
            "pixel_values": batch["pixel_values"][i : i + 1]}


TINY_WORDS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:")


def tiny_processor(model: LlavaForConditionalGeneration, words: tuple[str, ...] = ()):
    """An offline ``LlavaProcessor`` for :func:`tiny_llava`: a whitespace word-level tokenizer (``<s>`` first) whose
    vocabulary is the special tokens, ``USER:``/``ASSISTANT:``, ``words``, then fillers up to the
    model's vocabulary size (``<image>`` keeps id 4), and a CLIP image processor at the model's size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    vocab_size = model.config.text_config.vocab_size
    vocab = list(dict.fromkeys((*TINY_WORDS, *words)))
    if len(vocab) > vocab_size:
        raise ValueError(f"words: {len(vocab)} distinct tokens do not fit the model's vocabulary of {vocab_size}")
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # as LLaMA
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    size = model.config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=model.config.vision_config.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")


# Tiny Qwen2-VL (M-RoPE, dynamic resolution): patch 2, merge 2, so an image of h x w patches gives
# (h / 2) x (w / 2) vision tokens in the decoder.
QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID = 4, 5, 6, 7
QWEN_PATCH_DIM = 3 * 2 * 2 * 2  # channels x temporal patch x patch x patch


def tiny_qwen2_vl(num_layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                  attn_implementation: str = "sdpa", seed: int = 0, version: str = "2"):
    """A random ``Qwen2VLForConditionalGeneration`` (``version="2.5"``: ``Qwen2_5_VLForConditionalGeneration``)
    with a one-block vision tower (patch 2, spatial merge 2) and ``num_layers`` decoder layers."""
    import transformers

    torch.manual_seed(seed)
    head_dim = hidden // heads
    third = head_dim // 2 // 3  # M-RoPE sections over head_dim / 2 frequency pairs
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [head_dim // 2 - 2 * third, third, third]})
    vision = dict(depth=1, hidden_size=hidden, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    if version == "2":
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision.update(embed_dim=32)
    elif version == "2.5":
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision.update(hidden_size=32, out_hidden_size=hidden, intermediate_size=64, window_size=8,
                      fullatt_block_indexes=[0])
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config = config_cls(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_TOKEN_ID,
                        video_token_id=QWEN_VIDEO_TOKEN_ID, vision_start_token_id=QWEN_VISION_START_ID,
                        vision_end_token_id=QWEN_VISION_END_ID)
    config._attn_implementation = attn_implementation
    model = model_cls(config).eval()
    with torch.no_grad():  # sharpen the attention of random weights, as in tiny_llava
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def tiny_qwen2_vl_inputs(
    images: tuple[tuple[tuple[int, int], ...], ...] = (((8, 12),),),
    prefix_lengths: tuple[int, ...] | None = None,
    prompt_lengths: tuple[int, ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A left-padded batch for :func:`tiny_qwen2_vl`: per sample ``[bos prefix]`` then, per image of
    ``images[b]`` (h x w patches, both even), ``<vision_start> image tokens <vision_end>``, then a prompt;
    with pixel values, ``image_grid_thw`` and ``mm_token_type_ids`` as the Qwen2-VL processor returns them."""
    generator = torch.Generator().manual_seed(seed)
    prefix_lengths = prefix_lengths or tuple(2 + b for b in range(len(images)))
    prompt_lengths = prompt_lengths or tuple(3 + 2 * b for b in range(len(images)))
    rows, pixels, grids = [], [], []
    for sample_images, prefix, prompt in zip(images, prefix_lengths, prompt_lengths):
        row = [1] + torch.randint(8, VOCAB_SIZE, (prefix,), generator=generator).tolist()
        for h, w in sample_images:
            row += [QWEN_VISION_START_ID] + [QWEN_IMAGE_TOKEN_ID] * (h * w // 4) + [QWEN_VISION_END_ID]
            pixels.append(torch.randn(h * w, QWEN_PATCH_DIM, generator=generator))
            grids.append([1, h, w])
        rows.append(torch.tensor(row + torch.randint(8, VOCAB_SIZE, (prompt,), generator=generator).tolist()))
    input_ids, attention_mask = left_pad(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_grid_thw": torch.tensor(grids) if grids else None,
            "mm_token_type_ids": (input_ids == QWEN_IMAGE_TOKEN_ID).int()}


def qwen2_vl_single_inputs(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a batch from :func:`tiny_qwen2_vl_inputs`, without its padding (batch of 1)."""
    keep = batch["attention_mask"][i].bool()
    input_ids = batch["input_ids"][i : i + 1, keep]
    from .language_model import image_spans

    # the images of earlier samples come first in pixel_values and image_grid_thw
    spans = [len(image_spans(ids == QWEN_IMAGE_TOKEN_ID)) for ids in batch["input_ids"]]
    first, count = sum(spans[:i]), spans[i]
    patches = batch["image_grid_thw"].prod(-1)
    start = int(patches[:first].sum())
    return {"input_ids": input_ids, "attention_mask": batch["attention_mask"][i : i + 1, keep],
            "pixel_values": batch["pixel_values"][start : start + int(patches[first : first + count].sum())],
            "image_grid_thw": batch["image_grid_thw"][first : first + count],
            "mm_token_type_ids": (input_ids == QWEN_IMAGE_TOKEN_ID).int()}
