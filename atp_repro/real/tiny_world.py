"""A complete real-scale setup in miniature: a tiny random LLaVA folder, LLaVA-format data, a config.

The real path (HF Trainer, DeepSpeed ZeRO-3, checkpoints, resume, reload) is exercised on a CPU with
the same classes and file layouts as LLaVA-1.5-7B, only smaller::

    python -m atp_repro.real.tiny_world /tmp/tiny            # writes model/, images/, data.json, config.yaml
    torchrun --nproc_per_node 2 -m atp_repro train --config /tmp/tiny/config.yaml

The data asks for the colour of a plain image (four colours), plus one text-only sample, so that
the loss has something to learn and mixed batches occur.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from PIL import Image

from .. import paths
from ..atp.tiny import tiny_llava, tiny_processor

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 20)}
WORDS = ("what", "colour", "is", "the", "image", "?", "say", "hello", *COLOURS)
GRID = 4  # 4 x 4 vision tokens
LAYERS = 4


def tiny_config(root: Path, *, world_size: int = 2, zero_stage: int = 3, freeze_llm: bool = False,
                save_steps: int = 2, gradient_checkpointing: bool = False) -> dict:
    """The config mapping of a tiny run (the real config's structure; values scaled to the tiny model)."""
    return {
        "name": "tiny-real", "scale": "real",
        "description": "tiny random LLaVA trained through the real-scale path (CPU test)",
        "model": {"name_or_path": str(root / "model"), "num_hidden_layers": LAYERS, "vision_grid": GRID},
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
                "score_normalisation": "minmax", "position_encoding": "learned2d", "init_calibration": "none"},
        "data": {"train_json": str(root / "data.json"), "image_folder": str(root / "images"), "max_length": 64},
        "run": {"output_dir": str(root / "out"), "save_steps": save_steps, "logging_steps": 1,
                "dataloader_num_workers": 0, "gradient_checkpointing": gradient_checkpointing},
    }


def write_tiny_world(root: str | Path, *, samples: int = 16, **config) -> Path:
    """Write ``model/``, ``images/``, ``data.json`` (``samples`` image questions and one text-only
    sample) and ``config.yaml`` under ``root``; return the config path. ``config``: see :func:`tiny_config`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    model = tiny_llava(num_layers=LAYERS, grid=GRID)
    processor = tiny_processor(model, words=WORDS)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    names = list(COLOURS)
    data = []
    for i in range(samples):
        colour = names[i % len(names)]
        Image.new("RGB", (20 + i, 16), COLOURS[colour]).save(root / "images" / f"{i}.png")
        data.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "what colour is the image ?\n<image>"}, {"from": "gpt", "value": colour}]})
    data.insert(min(3, len(data)), {"id": "text0", "conversations": [
        {"from": "human", "value": "say hello"}, {"from": "gpt", "value": "hello"}]})
    (root / "data.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root, **config), sort_keys=False), encoding="utf-8")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m atp_repro.real.tiny_world <folder>")
    print(write_tiny_world(sys.argv[1]))
