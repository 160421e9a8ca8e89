"""LLaVA instruction data (the LLaVA-665k format) as a torch Dataset and a padding collator.

The file is a JSON list of samples::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",       # optional: text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

Image paths are relative to an image folder. A sample becomes token ids with the conversation
template LLaVA-1.5 trained with ("vicuna_v1": a system sentence, ``USER: ... ASSISTANT: ...</s>``),
or with the processor's chat template (``template="processor"``). The whole conversation is
tokenized at once, as LLaVA does (SentencePiece tokenizes a piece of text differently on its own).
Labels are -100 everywhere but on the assistant turns (their text and end-of-sequence token), as in
LLaVA; the collator passes the
same positions to ATP as ``atp_answer_mask`` (answers are not queries of the cross-modality score).

Every sample is checked when the dataset is built (conversation shape, one ``<image>`` per sample
with an image, the image file, the token count against ``max_length``): with ``on_invalid="fail"``
the first problem raises :class:`LlavaDataError` naming the file, the sample index and id; with
``"skip"`` the sample is left out and counted in ``dataset.skipped``. One image per sample is
supported (LLaVA-1.5's data has at most one); text-only samples are, in mixed batches too.

Dynamic resolution (Qwen2-VL, Qwen2.5-VL; ``num_image_tokens=None``): each image keeps its own size
and aspect ratio (``image_aspect_ratio="native"``; no padding to a square), its image span has as many
tokens as the image processor's patch grid gives (``image_grid_thw`` product / ``merge_size`` squared),
and an item carries the image's patches (``pixel_values``, (patches, patch dim)) and its grid
(``image_grid_thw``, (3,)). The token count of a sample is then read from the image file's size when
the dataset is built. The processor's chat template renders the conversation (``template="processor"``).
The data marks the image with ``<image>`` in either case, as LLaVA-665k does.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

ON_INVALID = ("fail", "skip")
TEMPLATES = ("llava_v1", "processor")
ASPECT_RATIOS = ("pad", "crop")  # a fixed grid (LLaVA-1.5)
DYNAMIC_ASPECT_RATIOS = ("pad", "native")  # dynamic resolution (Qwen2-VL): pad to a square, or the image as it is
IMAGE_MARKER = "<image>"  # the image's place in a human turn of LLaVA-format data
ROLES = {"human": "user", "gpt": "assistant"}
IGNORE_INDEX = -100
# LLaVA-1.5's system sentence (conversation template "vicuna_v1"), used when the processor has no chat template
LLAVA15_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")


class LlavaDataError(ValueError):
    """A sample that cannot be used; the message names the file, the sample index and its id."""


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool  # an assistant turn (labels kept)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def conversation_messages(sample: dict, image_token: str = IMAGE_MARKER) -> list[dict]:
    """The sample's turns as chat messages (``role``, ``content`` list); raises ValueError if malformed.

    As LLaVA does, the image marker is moved to the start of the turn that holds it."""
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    has_image = sample.get("image") is not None
    markers = 0
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {t} must be {{'from': 'human' | 'gpt', 'value': str}}, got {turn!r:.120}")
        role = ROLES[turn["from"]]
        expected = "user" if t % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {t} is from {turn['from']!r}: turns must alternate human, gpt, human, ... "
                             "starting with human")
        text = turn["value"]
        count = text.count(image_token)
        if count and role == "assistant":
            raise ValueError(f"turn {t} (gpt) contains {image_token}")
        markers += count
        content = [{"type": "image"}] if count else []
        content.append({"type": "text", "text": text.replace(image_token, "").strip() if count else text})
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last turn must be from gpt (an answer to train on)")
    if has_image and markers != 1:
        raise ValueError(f"a sample with an image needs exactly one {image_token} in its turns, found {markers} "
                         "(one image per sample is supported)")
    if not has_image and markers:
        raise ValueError(f"{image_token} in a sample without 'image'")
    return messages


def _fallback_segments(messages: list[dict], image_token: str, eos: str, system: str | None) -> list[Segment]:
    """LLaVA-1.5's template: '{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...'."""
    segments = []
    head = f"{system} " if system else ""
    for message in messages:
        text = message["content"][-1]["text"]
        if message["role"] == "user":
            image = f"{image_token}\n" if message["content"][0]["type"] == "image" else ""
            segments.append(Segment(f"{head}USER: {image}{text} ASSISTANT:", False))
            head = ""
        else:
            segments.append(Segment(f" {text}{eos}", True))
    return segments


def _template_segments(processor, messages: list[dict], eos: str) -> list[Segment]:
    """Segments from the processor's chat template, by rendering growing prefixes of the conversation."""
    def render(part: list[dict], generation_prompt: bool) -> str:
        return processor.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for k, message in enumerate(messages):
        upto = render(messages[: k + 1], message["role"] == "user")  # a user turn ends with the assistant prompt
        if not upto.startswith(done):
            raise ValueError("the processor's chat template does not render a conversation as a growing prefix; "
                             "remove its chat_template to use LLaVA-1.5's template")
        text = upto[len(done):]
        if message["role"] == "assistant" and not text.rstrip().endswith(eos):
            text = text.rstrip() + eos  # LLaVA trains the end of each answer (right after it, no space)
        segments.append(Segment(text, message["role"] == "assistant"))
        done = upto  # the rendered text so far (an added end-of-answer token is not part of it)
    return segments


def expand_to_square(image, background: tuple[int, int, int]):
    """LLaVA-1.5's ``pad`` aspect ratio: the image centred on a square of the processor's mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class LlavaInstructDataset(torch.utils.data.Dataset):
    """LLaVA-format samples as ``input_ids``, ``labels`` and ``pixel_values`` (None for text-only), plus
    ``image_grid_thw`` (None for text-only) with dynamic resolution.

    Args:
        json_path: the JSON list of samples.
        image_folder: the folder image paths are relative to.
        processor: the model's processor (tokenizer, image processor, optional chat template).
        num_image_tokens: vision tokens one image takes in the sequence (``config.image_seq_length``), or
            None for dynamic resolution (Qwen2-VL: each image's own count, from the image processor's grid).
        max_length: the longest sample in tokens (image tokens included).
        on_invalid: ``"fail"`` (raise on the first bad sample) or ``"skip"`` (leave it out, counted).
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5 training: pad to a square) or ``"crop"`` (the processor's);
            with dynamic resolution ``"pad"`` or ``"native"`` (the image's own size and aspect ratio).
        template: ``"llava_v1"`` (LLaVA-1.5's training template, with ``system``) or ``"processor"`` (the
            processor's chat template; llava-hf's has no system sentence).
        system: the system sentence of the ``llava_v1`` template (LLaVA-1.5's by default; None: none).
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path | None, processor,
                 num_image_tokens: int | None, *, max_length: int = 2048, on_invalid: str = "fail",
                 image_aspect_ratio: str = "pad", template: str = "llava_v1",
                 system: str | None = LLAVA15_SYSTEM) -> None:
        _check_choice("on_invalid", on_invalid, ON_INVALID)
        _check_choice("template", template, TEMPLATES)
        if not getattr(getattr(processor, "tokenizer", processor), "is_fast", False):
            raise ValueError("a fast tokenizer (tokenizer.json) is needed: labels come from its character offsets")
        self.dynamic = num_image_tokens is None
        if self.dynamic:
            _check_dynamic_resolution(processor, template)
        aspect_ratios = DYNAMIC_ASPECT_RATIOS if self.dynamic else ASPECT_RATIOS
        _check_choice("image_aspect_ratio", image_aspect_ratio, aspect_ratios)
        if (not self.dynamic and num_image_tokens < 1) or max_length < 1:
            raise ValueError(f"num_image_tokens and max_length must be >= 1, got {num_image_tokens}, {max_length}")
        self.json_path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token = getattr(processor, "image_token", None) or IMAGE_MARKER
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        video_token = getattr(processor, "video_token", None)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(video_token) if video_token else None
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_aspect_ratio = image_aspect_ratio
        self.system = system
        self.template = template
        try:
            samples = json.loads(self.json_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LlavaDataError(f"{self.json_path}: no such file (data.train_json)") from None
        except json.JSONDecodeError as err:
            raise LlavaDataError(f"{self.json_path}: not valid JSON ({err})") from None
        if not isinstance(samples, list):
            raise LlavaDataError(f"{self.json_path}: expected a JSON list of samples, got {type(samples).__name__}")
        # Every sample is encoded once to check it; only its length is kept, and the ids are made again
        # when the sample is read (665k encoded samples would hold ~10 GB of Python ints).
        kept: list[dict] = []
        lengths: list[int] = []
        self.skipped: Counter[str] = Counter()
        for index, sample in enumerate(samples):
            try:
                lengths.append(len(self._encode(sample)[0]))
                kept.append(sample)
            except ValueError as err:
                sid = sample.get("id") if isinstance(sample, dict) else None
                where = f"{self.json_path}: sample {index}" + (f" (id {sid})" if sid is not None else "")
                if on_invalid == "fail":
                    raise LlavaDataError(f"{where}: {err} (data.on_invalid: 'skip' leaves such samples out)") from None
                self.skipped[str(err).split(":")[0]] += 1
        if self.skipped:
            logger.warning("%s: skipped %d of %d samples: %s", self.json_path, sum(self.skipped.values()),
                           len(samples), dict(self.skipped))
        if not kept:
            raise LlavaDataError(f"{self.json_path}: no usable sample (skipped: {dict(self.skipped)})")
        if sum(self.skipped.values()) > len(kept):  # more bad than good: a wrong path, not a few bad samples
            raise LlavaDataError(f"{self.json_path}: {sum(self.skipped.values())} of {len(samples)} samples would be "
                                 f"skipped ({dict(self.skipped)}); check data.image_folder and the file")
        self.lengths = np.asarray(lengths, dtype=np.int32)
        # The kept samples as one byte buffer and offsets, not 665k Python dicts: data-loader workers
        # share it (a list of dicts is copied page by page into every worker as reference counts change).
        blobs = [json.dumps(sample, separators=(",", ":")).encode() for sample in kept]
        self._offsets = np.cumsum([0, *map(len, blobs)], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def sample(self, index: int) -> dict:
        """The ``index``-th kept sample, as in the JSON file."""
        return json.loads(self._blob[self._offsets[index]:self._offsets[index + 1]].tobytes())

    @property
    def samples(self) -> list[dict]:
        """Every kept sample (decoded; for inspection, not for training loops)."""
        return [self.sample(i) for i in range(len(self))]

    # -- encoding ---------------------------------------------------------------------------

    def _segments(self, messages: list[dict]) -> list[Segment]:
        eos = self.tokenizer.eos_token or ""
        if self.template == "processor":
            if not getattr(self.processor, "chat_template", None):
                raise ValueError("conversation_template='processor', but the processor has no chat_template")
            return _template_segments(self.processor, messages, eos)
        return _fallback_segments(messages, self.image_token, eos, self.system)

    def _tokens(self, segments: list[Segment], image_tokens: int) -> tuple[list[int], list[int]]:
        """The conversation tokenized once, as a whole (a SentencePiece tokenizer tokenizes a piece of text
        differently on its own), labelled by the character spans of the assistant segments: a token is
        trained if its last character lies in one. The image token becomes the image's span of
        ``image_tokens`` tokens (0: the sample has no image, and the text must hold no image token)."""
        text = "".join(segment.text for segment in segments)
        trained = torch.zeros(len(text) + 1, dtype=torch.bool)
        start = 0
        for segment in segments:
            trained[start:start + len(segment.text)] = segment.trained
            start += len(segment.text)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        _check_vision_tokens(encoded["input_ids"], self.image_token_id, int(image_tokens > 0), self.video_token_id)
        input_ids: list[int] = []
        labels: list[int] = []
        for token, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token == self.image_token_id:
                input_ids += [token] * image_tokens
                labels += [IGNORE_INDEX] * image_tokens
                continue
            input_ids.append(token)
            labels.append(token if bool(trained[max(begin, end - 1)]) else IGNORE_INDEX)
        return input_ids, labels

    def _with_bos(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + ids, ([IGNORE_INDEX] if bos is not None else []) + labels

    def _encode(self, sample, image_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a sample; ``image_tokens``: its image's token count if known (else
        ``num_image_tokens``, or with dynamic resolution the count the image file's size gives)."""
        if not isinstance(sample, dict):
            raise ValueError(f"malformed sample: expected a mapping, got {type(sample).__name__}")
        try:
            messages = conversation_messages(sample, IMAGE_MARKER)
        except ValueError as err:
            raise ValueError(f"malformed conversation: {err}") from None
        if sample.get("image") is not None:
            if self.image_folder is None:
                raise ValueError(f"missing image: {sample['image']} (no data.image_folder given)")
            path = self.image_folder / str(sample["image"])
            if not path.is_file():
                raise ValueError(f"missing image: {path}")
            if image_tokens is None:
                image_tokens = self._image_tokens(path)
        input_ids, labels = self._with_bos(*self._tokens(self._segments(messages), image_tokens or 0))
        if len(input_ids) > self.max_length:
            raise ValueError(f"over the maximum length: {len(input_ids)} tokens > data.max_length={self.max_length}")
        return input_ids, labels

    def _image_tokens(self, path: Path) -> int:
        """Tokens of the image at ``path``: ``num_image_tokens``, or with dynamic resolution what the image
        processor's grid for the file's size (read from its header) gives."""
        if not self.dynamic:
            return self.num_image_tokens
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"unreadable image: {path} ({err})") from None
        if self.image_aspect_ratio == "pad":
            width = height = max(width, height)
        image_processor = self.processor.image_processor
        try:  # the processor's resize refuses e.g. an aspect ratio over 200 (its message names no file)
            patches = image_processor.get_number_of_image_patches(height, width, {})
        except ValueError as err:
            raise ValueError(f"unusable image: {path} ({err})") from None
        return patches // image_processor.merge_size**2

    # -- Dataset ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    def _load_image(self, relative: str):
        """The RGB image, padded to a square of the processor's mean colour with ``image_aspect_ratio="pad"``."""
        from PIL import Image

        with Image.open(self.image_folder / relative) as raw:
            image = raw.convert("RGB")
        if self.image_aspect_ratio == "pad":
            image = expand_to_square(image, self._mean_colour())
        return image

    def _mean_colour(self) -> tuple[int, int, int]:
        mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        return tuple(int(255 * m) for m in mean)

    def _pixel_values(self, relative: str) -> torch.Tensor:
        """A fixed-grid image: (3, H, W)."""
        return self.processor.image_processor(images=self._load_image(relative), return_tensors="pt")["pixel_values"][0]

    def _patches(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic resolution: ``(pixel_values, image_grid_thw)`` of one image, (patches, patch dim) and (3,)
        (temporal, height, width in patches), as the image processor gives them."""
        processed = self.processor.image_processor(images=image, return_tensors="pt")
        return processed["pixel_values"], processed["image_grid_thw"][0]

    def _grid_tokens(self, grid: torch.Tensor) -> int:
        """Tokens of an image in the sequence: its patches merged ``merge_size`` x ``merge_size``."""
        return int(grid.prod()) // self.processor.image_processor.merge_size**2

    def padding_image_sample(self) -> dict:
        """A sample made of an image span alone (a mean-colour image, no label): see :class:`LlavaCollator`.

        With dynamic resolution the image is the smallest the image processor makes (one merge block per side
        before its minimum size applies), in the chat template's user turn (its markers around the image)."""
        if self.dynamic:
            return self._dynamic_padding_sample()
        size = self.processor.image_processor.crop_size or self.processor.image_processor.size
        height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        bos = self.tokenizer.bos_token_id
        input_ids = ([bos] if bos is not None else []) + [self.image_token_id] * self.num_image_tokens
        return {"input_ids": torch.tensor(input_ids), "labels": torch.full((len(input_ids),), IGNORE_INDEX),
                "pixel_values": torch.zeros(3, height, width)}

    def _dynamic_padding_sample(self) -> dict:
        from PIL import Image

        image_processor = self.processor.image_processor
        side = image_processor.patch_size * image_processor.merge_size
        pixel_values, grid = self._patches(Image.new("RGB", (side, side), self._mean_colour()))
        turn = self.processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
        input_ids, _ = self._with_bos(*self._tokens([Segment(turn, False)], self._grid_tokens(grid)))
        return {"input_ids": torch.tensor(input_ids), "labels": torch.full((len(input_ids),), IGNORE_INDEX),
                "pixel_values": torch.zeros_like(pixel_values), "image_grid_thw": grid}

    def __getitem__(self, index: int) -> dict:
        sample = self.sample(index)
        image = sample.get("image")
        if not self.dynamic:
            input_ids, labels = self._encode(sample)
            return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
                    "pixel_values": None if image is None else self._pixel_values(str(image))}
        pixel_values = grid = None
        if image is not None:
            pixel_values, grid = self._patches(self._load_image(str(image)))
        input_ids, labels = self._encode(sample, None if grid is None else self._grid_tokens(grid))
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "pixel_values": pixel_values,
                "image_grid_thw": grid}


def _check_dynamic_resolution(processor, template: str) -> None:
    """What dynamic resolution (``num_image_tokens=None``) needs of the processor and the template."""
    image_processor = getattr(processor, "image_processor", None)
    if getattr(image_processor, "merge_size", None) is None or \
            not hasattr(image_processor, "get_number_of_image_patches"):
        raise ValueError("num_image_tokens=None (dynamic resolution) needs an image processor that gives each image "
                         "its own patch grid (Qwen2-VL's: merge_size, image_grid_thw); got "
                         f"{type(image_processor).__name__}")
    if template != "processor":
        raise ValueError(f"template={template!r} is LLaVA-1.5's; a dynamic-resolution model (Qwen2-VL) is trained "
                         "with its processor's chat template: template='processor'")


def _check_vision_tokens(ids: list[int], image_token_id: int, images: int, video_token_id: int | None) -> None:
    """The rendered conversation holds one image token per image and no video token (a literal image or video
    token in a turn's text would take image features the sample does not have)."""
    found = sum(token == image_token_id for token in ids)
    if found != images:
        raise ValueError(f"image tokens in the text: the rendered conversation holds {found} image tokens for "
                         f"{images} image(s)")
    if video_token_id is not None and video_token_id in ids:
        raise ValueError("video token in the text: videos are not supported")


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None) -> torch.Tensor:
    """(B, L) long: 1 at image tokens, 2 at video tokens, 0 elsewhere (padding included), as Qwen2-VL's processor
    marks a batch (``ProcessorMixin.create_mm_token_type_ids``); its M-RoPE positions are read from them."""
    types = torch.zeros_like(input_ids, dtype=torch.long)
    types[input_ids == image_token_id] = 1
    if video_token_id is not None:
        types[input_ids == video_token_id] = 2
    return types


@dataclass
class LlavaCollator:
    """Right-pads a list of samples into a batch.

    ``pixel_values`` stacks the images of the samples that have one (in order, as LLaVA matches
    them to the image spans). With ``answer_mask`` the batch carries ``atp_answer_mask`` (True at
    assistant tokens) for an ATP model.

    Dynamic resolution (samples with ``image_grid_thw``, Qwen2-VL): ``pixel_values`` concatenates the
    images' patches (sum of patches, patch dim) and ``image_grid_thw`` stacks their grids (images, 3), in
    sample order. With ``image_token_id`` set, the batch carries ``mm_token_type_ids``
    (:func:`mm_token_type_ids`), which Qwen2-VL needs for its M-RoPE positions.

    A batch without any image gets ``padding_sample`` (if given) appended: an image span with no
    label (LLaVA-1.5 feeds text-only samples a blank image for the same reason). Every process then
    runs the vision tower and the ATP modules in the same order, which DeepSpeed ZeRO-3 needs (its
    parameter gathers are collectives); the LM loss is unchanged (the row has no label) and the
    batch says ``atp_padding_image`` so that the trainer zeroes the row's budget loss.
    """

    pad_token_id: int
    answer_mask: bool = True
    padding_sample: dict | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        padded = self.padding_sample is not None and all(s["pixel_values"] is None for s in samples)
        if padded:
            samples = [*samples, self.padding_sample]
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[i, :n] = sample["input_ids"]
            labels[i, :n] = sample["labels"]
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_image = [s for s in samples if s["pixel_values"] is not None]
        if with_image and with_image[0].get("image_grid_thw") is not None:  # dynamic resolution: patches
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_image])  # (patches, patch dim)
            batch["image_grid_thw"] = torch.stack([s["image_grid_thw"] for s in with_image])  # (images, 3)
        elif with_image:
            batch["pixel_values"] = torch.stack([s["pixel_values"] for s in with_image])  # (images, 3, H, W)
        if self.image_token_id is not None:
            batch["mm_token_type_ids"] = mm_token_type_ids(input_ids, self.image_token_id, self.video_token_id)
        if self.answer_mask:
            batch["atp_answer_mask"] = labels != IGNORE_INDEX
        if self.padding_sample is not None:
            batch["atp_padding_image"] = padded
        return batch


def collator_for(dataset: LlavaInstructDataset, pad_token_id: int, *, answer_mask: bool = True) -> LlavaCollator:
    """The collator of a dataset's batches: with its padding image sample (see :class:`LlavaCollator`) and, with
    dynamic resolution, ``mm_token_type_ids``."""
    return LlavaCollator(pad_token_id, answer_mask=answer_mask, padding_sample=dataset.padding_image_sample(),
                         image_token_id=dataset.image_token_id if dataset.dynamic else None,
                         video_token_id=dataset.video_token_id if dataset.dynamic else None)
