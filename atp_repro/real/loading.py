"""Load a vision-language checkpoint from a local Hugging Face folder, never from the network.

Supported are the model types ATP supports (:mod:`atp_repro.atp.architectures`), read from the
folder's ``config.json``: ``llava`` (LLaVA-1.5, ``LlavaForConditionalGeneration``), ``qwen2_vl``
(``Qwen2VLForConditionalGeneration``) and ``qwen2_5_vl`` (``Qwen2_5_VLForConditionalGeneration``).

A folder in the hub layout (``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2-VL-7B-Instruct``) holds
``config.json``, the weights (``model.safetensors``, or ``model.safetensors.index.json`` and every
shard it lists; ``.bin`` equivalents are accepted), the tokenizer (``tokenizer_config.json`` plus
``tokenizer.json`` or ``tokenizer.model``) and the image processor (``preprocessor_config.json``, or
``processor_config.json`` as transformers 5 writes it). The folder is checked first, so that a
missing or partial download fails with a message naming the missing file instead of transformers'
"Repo id must be in the form ..." or a hub lookup, and an unsupported model type fails naming it
before any weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path

PLACEHOLDERS = ("path/to/llava-1.5-7b-hf", "path/to/Qwen2-VL-7B-Instruct")  # the shipped configs' model paths
PLACEHOLDER = PLACEHOLDERS[0]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 5 writes the second
# config.json model_type -> the transformers class that loads it
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")  # M-RoPE, dynamic resolution


class ModelFolderError(FileNotFoundError):
    """A local model folder is missing or incomplete; the message names the missing file."""


class UnsupportedModelError(ValueError):
    """The folder's ``config.json`` names a model type this loader does not build."""


def _layout_hint() -> str:
    return ("expected a local HF-format folder in the hub layout, e.g. llava-hf/llava-1.5-7b-hf or "
            "Qwen/Qwen2-VL-7B-Instruct: config.json, model*.safetensors, tokenizer_config.json + tokenizer.json or "
            "tokenizer.model, preprocessor_config.json or processor_config.json")


def check_model_folder(path: str | Path, *, need_processor: bool = True, what: str = "model.name_or_path") -> Path:
    """The folder as a Path if it holds a complete checkpoint; else :class:`ModelFolderError`.

    Args:
        path: the folder.
        need_processor: also require the tokenizer and image-processor files.
        what: the name of the setting the path came from (used in messages).
    """
    folder = Path(path).expanduser()
    if str(path) in PLACEHOLDERS:
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


def model_type(path: str | Path, *, supported: tuple[str, ...] = tuple(MODEL_CLASSES),
               what: str = "model.name_or_path") -> str:
    """The ``model_type`` of a checked folder's ``config.json``; :class:`UnsupportedModelError` naming it and
    the ``supported`` types if it is not one of them."""
    folder = Path(path).expanduser()
    try:
        found = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{what}={path!s}: config.json is not valid JSON ({err})") from None
    if found not in supported:
        raise UnsupportedModelError(
            f"{what}={path!s}: config.json has model_type {found!r}, which is not supported here; supported: "
            f"{', '.join(repr(t) for t in supported)} ({', '.join(MODEL_CLASSES[t] for t in supported)})")
    return found


def torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def load_processor(folder: str | Path, kind: str):
    """The folder's processor (``local_files_only``). Without torchvision a Qwen2-VL-family processor is loaded
    without its video processor (:mod:`atp_repro.real.processors`), which transformers cannot build there."""
    if kind in QWEN_MODEL_TYPES and not torchvision_available():
        from .processors import IMAGE_ONLY_PROCESSORS

        return IMAGE_ONLY_PROCESSORS[kind].from_pretrained(folder, local_files_only=True)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, local_files_only=True)


def load_vlm(path: str | Path, *, dtype=None, attn_implementation: str | None = None,
             what: str = "model.name_or_path", supported: tuple[str, ...] = tuple(MODEL_CLASSES)):
    """``(model, processor)`` from a checked local folder (``local_files_only``: nothing is downloaded), the model
    of the class its ``config.json`` ``model_type`` names (:data:`MODEL_CLASSES`, restricted to ``supported``).

    Under DeepSpeed ZeRO-3 create the ``TrainingArguments`` first: transformers then partitions the
    weights while loading them.
    """
    import transformers

    folder = check_model_folder(path, what=what)
    kind = model_type(folder, supported=supported, what=what)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = getattr(transformers, MODEL_CLASSES[kind]).from_pretrained(folder, **kwargs)
    return model, load_processor(folder, kind)


def load_llava(path: str | Path, *, dtype=None, attn_implementation: str | None = None,
               what: str = "model.name_or_path"):
    """:func:`load_vlm` for a LLaVA folder only; another model type fails naming it. (The evaluation loaders
    are :func:`atp_repro.real.evaluation.load_local_vlm`, for every model type here, and ``load_local_llava``.)"""
    return load_vlm(path, dtype=dtype, attn_implementation=attn_implementation, what=what, supported=("llava",))
