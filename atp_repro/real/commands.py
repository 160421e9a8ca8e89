"""The real-scale branch of ``atp-repro train --config <file with scale: real>`` (see atp_repro.real.train)."""

from __future__ import annotations

import argparse
import json

REAL_ONLY_CONFLICTS = {"--stage atp": lambda a: a.stage != "upper-bound", "--steps": lambda a: a.steps is not None,
                       "--frozen-lm": lambda a: a.frozen_lm, "--tokens-576": lambda a: a.tokens_576 is not None}


def is_real_config(path: str) -> bool:
    """Whether the config file declares ``scale: real`` (read without torch)."""
    from atp_repro.training_config import load_training_config

    return load_training_config(path).scale == "real"


def run_real_training(args: argparse.Namespace) -> int:
    for option, given in REAL_ONLY_CONFLICTS.items():
        if given(args):
            raise ValueError(f"{option} is a mini-world option; a real-scale config sets this in its file "
                             "(training.freeze_llm, run.max_steps, atp.n_target)")
    for option in ("max_steps", "stop_after_steps"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be an int >= 1, got {value}")
    from atp_repro.training_config import load_training_config

    cfg = load_training_config(args.config)
    if cfg.data is None:
        raise ValueError(f"{args.config}: a real-scale run needs a 'data' section (data.train_json, data.image_folder)")
    from atp_repro.real.loading import check_model_folder

    check_model_folder(cfg.model.name_or_path)  # before any heavy work
    from atp_repro.real.train import train_from_config

    summary = train_from_config(cfg, resume=args.resume, output_dir=args.output_dir, max_steps=args.max_steps,
                                stop_after_steps=args.stop_after_steps)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        keep = ("global_step", "max_steps", "train_loss", "precision", "processes", "gradient_accumulation_steps",
                "global_batch_size", "zero_stage", "samples", "skipped", "resumed_from", "final_model")
        print(json.dumps({k: summary[k] for k in keep}, indent=2, default=str))
    return 0
