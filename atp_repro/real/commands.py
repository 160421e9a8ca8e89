"""Real scale on the command line (auto-registered by atp_repro.cli).

    atp-repro train --config <file with scale: real>      # the Trainer path (atp_repro.real.train)
    atp-repro retention <upper-bound results> <ATP results> [--out table.csv]   # from lmms-eval result files
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from atp_repro.cli import subcommand

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
    from atp_repro.real.train import train_from_config  # checks files, sizes and the checkpoint before loading

    summary = train_from_config(cfg, resume=args.resume, output_dir=args.output_dir, max_steps=args.max_steps,
                                stop_after_steps=args.stop_after_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        keep = ("global_step", "max_steps", "train_loss", "precision", "processes", "gradient_accumulation_steps",
                "global_batch_size", "zero_stage", "samples", "skipped", "resumed_from", "final_model")
        print(json.dumps({k: summary[k] for k in keep}, indent=2, default=str))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_launched_process()
    return 0


def exit_launched_process() -> None:
    """End a process of a multi-process launch once its work is saved, without the interpreter's teardown.

    The process group is already destroyed (every rank passed a barrier, the summary and the model are
    written), but threads that DeepSpeed and gloo started can still be running when Python's shutdown
    destroys them, and a process then aborts ("terminate called without an active exception", exit -6)
    now and then although its work is done; the launcher reports the whole run as failed. Flushing the
    standard streams and leaving with ``os._exit(0)`` skips that teardown, atexit handlers included
    (the run's files are written and closed before)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@subcommand("retention", help="main Table 1's retention (Avg. Rate) from lmms-eval result files of two models")
def _retention(parser: argparse.ArgumentParser):
    parser.add_argument("upper_bound", help="lmms-eval result file, or folder of runs, of the unpruned model")
    parser.add_argument("pruned", help="lmms-eval result file, or folder of runs, of the pruned (ATP) model")
    parser.add_argument("--out", default=None, help="also write the table as CSV (atomically)")
    parser.add_argument("--scale", default="paper", choices=("paper", "raw"),
                        help="scores on the paper's printed scale (default) or as lmms-eval writes them")

    def run(args: argparse.Namespace) -> int:
        from atp_repro.real.evaluation import main

        return main(["retention", args.upper_bound, args.pruned, "--scale", args.scale,
                     *(["--out", args.out] if args.out else [])])

    return run
