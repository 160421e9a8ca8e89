"""Load a LLaVA checkpoint from a local Hugging Face folder, never from the network.

A folder in the ``llava-hf/llava-1.5-7b-hf`` layout holds ``config.json``, the weights
(``model.safetensors``, or ``model.safetensors.index.json`` and every shard it lists; ``.bin``
equivalents are accepted), the tokenizer (``tokenizer_config.json`` plus ``tokenizer.json`` or
``tokenizer.model``) and the image processor (``preprocessor_config.json``, or
``processor_config.json`` as transformers 5 writes it). The folder is checked
first, so that a missing or partial download fails with a message naming the missing file instead
of transformers' "Repo id must be in the form ..." or a hub lookup.
"""

from __future__ import annotations

import json
from pathlib import Path

PLACEHOLDER = "path/to/llava-1.5-7b-hf"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 5 writes the second


class ModelFolderError(FileNotFoundError):
    """A local model folder is missing or incomplete; the message names the missing file."""


def _layout_hint() -> str:
    return ("expected a local HF-format LLaVA folder (the llava-hf/llava-1.5-7b-hf layout: config.json, "
            "model*.safetensors, tokenizer_config.json + tokenizer.json or tokenizer.model, "
            "preprocessor_config.json or processor_config.json)")


def check_model_folder(path: str | Path, *, need_processor: bool = True, what: str = "model.name_or_path") -> Path:
    """The folder as a Path if it holds a complete checkpoint; else :class:`ModelFolderError`.

    Args:
        path: the folder.
        need_processor: also require the tokenizer and image-processor files.
        what: the name of the setting the path came from (used in messages).
    """
    folder = Path(path).expanduser()
    if str(path) == PLACEHOLDER:
        raise ModelFolderError(f"{what}={path!s} is the placeholder: set it to your local copy of the weights; "
                               f"{_layout_hint()}")
    if not folder.is_dir():
        raise ModelFolderError(f"{what}={path!s}: no such folder ({_layout_hint()}); weights are never downloaded")
    missing: list[str] = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    index = next((folder / name for name in INDEX_FILES if (folder / name).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ModelFolderError(f"{index}: not a weight index (no 'weight_map': {err})") from None
        missing += [shard for shard in shards if not (folder / shard).is_file()]
    elif not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join((*WEIGHT_FILES, INDEX_FILES[0])))
    if need_processor:
        if not (folder / "tokenizer_config.json").is_file():
            missing.append("tokenizer_config.json")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            missing.append(" or ".join(TOKENIZER_FILES))
        if not any((folder / name).is_file() for name in PROCESSOR_FILES):
            missing.append(" or ".join(PROCESSOR_FILES))
    if missing:
        raise ModelFolderError(f"{what}={path!s}: incomplete checkpoint folder, missing {', '.join(missing)} "
                               f"({_layout_hint()})")
    return folder


def load_llava(path: str | Path, *, dtype=None, attn_implementation: str | None = None,
               what: str = "model.name_or_path"):
    """``(model, processor)`` from a checked local folder (``local_files_only``: nothing is downloaded).

    Under DeepSpeed ZeRO-3 create the ``TrainingArguments`` first: transformers then partitions the
    weights while loading them.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = check_model_folder(path, what=what)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor
