"""Qwen2-VL / Qwen2.5-VL processors without a video processor, for machines without torchvision.

transformers' Qwen2-VL processors hold an image processor, a tokenizer and a video processor; the
video processor needs torchvision, so without it ``AutoProcessor.from_pretrained`` fails on a
Qwen2-VL folder, and a processor built with ``video_processor=None`` can neither be checked nor
saved. The classes here are the stock processors with images and text only (ATP prunes images;
videos are refused by :func:`atp_repro.atp.apply_atp` anyway): they load a stock folder, tokenize
and process images exactly as the stock class does, and ``save_pretrained`` writes the stock
layout under the stock class name, so that a machine with torchvision loads the folder with
``AutoProcessor``.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

VIDEO_ATTRIBUTE = "video_processor"


class _ImageOnly:
    """Mixin: the processor's attributes without the video processor."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [name for name in super().get_attributes() if name != VIDEO_ATTRIBUTE]


class ImageOnlyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (see the module docstring)."""


class ImageOnlyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (see the module docstring)."""


# save_pretrained records ``type(processor).__name__`` as the folder's processor class: name the stock class,
# which AutoProcessor resolves (pickling goes by __qualname__, which stays this module's own).
ImageOnlyQwen2VLProcessor.__name__ = Qwen2VLProcessor.__name__
ImageOnlyQwen2_5_VLProcessor.__name__ = Qwen2_5_VLProcessor.__name__

IMAGE_ONLY_PROCESSORS = {"qwen2_vl": ImageOnlyQwen2VLProcessor, "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor}
