"""``atp-repro train`` and ``atp-repro eval`` for the mini world (auto-registered by atp_repro.cli).

    atp-repro train                          # upper-bound model (cached; resumes if killed)
    atp-repro train --stage atp              # + ATP fine-tune with configs/mini_world.yaml
    atp-repro train --stage atp --frozen-lm --tokens-576 88
    atp-repro eval --stage atp --n-test 600 --out build/eval.csv
    atp-repro eval --baseline fastv --tokens-576 144   # a training-free baseline on the upper bound
"""

from __future__ import annotations

import argparse
import json
import math

from atp_repro.cli import subcommand

STAGES = ("upper-bound", "atp")
# atp_repro.baselines.METHODS (not imported here: it imports torch)
BASELINES = ("fastv", "pyramiddrop", "sparsevlm", "uniform", "random", "visionzip", "prumerge+")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="training config (default configs/mini_world.yaml)")
    parser.add_argument("--stage", choices=STAGES, default="upper-bound", help="which model (default upper-bound)")
    parser.add_argument("--steps", type=int, default=None, help="ATP fine-tuning steps")
    parser.add_argument("--frozen-lm", action="store_true", help="train only the ATP modules")
    parser.add_argument("--tokens-576", type=float, default=None,
                        help="token goal in LLaVA-1.5 units of 576 (N_target = goal x 130/144); default 144")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_args(args: argparse.Namespace) -> None:
    """Every option checked before any work starts (ValueError naming the option, value and what is allowed)."""
    baseline = getattr(args, "baseline", None)
    atp_only = {"--steps": args.steps is not None, "--frozen-lm": bool(args.frozen_lm)}
    for option, given in atp_only.items():
        if given and args.stage != "atp":
            raise ValueError(f"{option} applies to --stage atp only (got --stage {args.stage})")
    if args.tokens_576 is not None and args.stage != "atp" and not baseline:
        raise ValueError(f"--tokens-576 applies to --stage atp or --baseline only (got --stage {args.stage})")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be an int >= 1, got {args.steps}")
    if args.tokens_576 is not None and not (math.isfinite(args.tokens_576) and 0 < args.tokens_576 <= 576):
        raise ValueError(f"--tokens-576 must be a number of tokens in (0, 576], got {args.tokens_576}")
    n_test = getattr(args, "n_test", None)
    if n_test is not None and n_test < 1:
        raise ValueError(f"--n-test must be an int >= 1, got {n_test}")
    if getattr(args, "out", None):
        from atp_repro.paths import check_output_file

        args.out = str(check_output_file(args.out, "--out"))  # resolved as bench resolves --output


def _load(args: argparse.Namespace):
    check_args(args)
    from atp_repro.mini.experiments import Setup, Variant

    setup = Setup.load(args.config, finetune_steps=args.steps)
    if getattr(args, "baseline", None):
        from atp_repro.baselines import VISION_SIDE_METHODS, stage_counts
        from atp_repro.mini.runs import tokens_for_576

        tokens = tokens_for_576(args.tokens_576 if args.tokens_576 is not None else 144.0, setup.grid)
        try:  # before the upper bound is loaded (or trained)
            if args.baseline in VISION_SIDE_METHODS:
                if not 2 <= tokens <= setup.grid ** 2:
                    raise ValueError(f"{args.baseline} keeps from 2 to {setup.grid ** 2} tokens, got {tokens:g}")
            else:
                stage_counts(args.baseline, tokens, setup.world.model.lm_layers, setup.grid ** 2)
        except ValueError as err:
            grid = f"{setup.grid}x{setup.grid}"
            raise ValueError(f"--tokens-576 {args.tokens_576}: {err} (grid units of {grid})") from err
        return setup.baseline(args.baseline, tokens), setup.world
    if args.stage == "upper-bound":
        return setup.upper_bound(progress=not args.no_progress), setup.world
    # the same runs as the notebooks' catalogue (trainable_144, frozen_88, ...), so the cache is shared
    variant = Variant(144.0 if args.tokens_576 is None else args.tokens_576, bool(args.frozen_lm),
                      (("position_encoding", "original"),) if args.frozen_lm else ())
    return setup.finetune(variant, progress=not args.no_progress), setup.world


@subcommand("train", help="train a mini-world model, or a real-scale ATP-LLaVA from a config with scale: real")
def _train(parser: argparse.ArgumentParser):
    _common(parser)
    real = parser.add_argument_group("real scale (a --config with scale: real; HF Trainer, DeepSpeed under a launcher)")
    real.add_argument("--resume", default=None, metavar="CHECKPOINT",
                      help="continue from a checkpoint folder, or 'last' for the newest in the output folder")
    real.add_argument("--output-dir", default=None, help="override run.output_dir")
    real.add_argument("--max-steps", type=int, default=None, help="override run.max_steps (optimizer steps)")
    real.add_argument("--stop-after-steps", type=int, default=None,
                      help="stop after this many steps, leaving a checkpoint, as a killed job would (resume tests)")

    def run(args: argparse.Namespace) -> int:
        if args.config is not None:
            from atp_repro.real.commands import is_real_config, run_real_training

            if is_real_config(args.config):
                return run_real_training(args)
        for option in ("resume", "output_dir", "max_steps", "stop_after_steps"):
            if getattr(args, option) is not None:
                parser.error(f"--{option.replace('_', '-')} applies to a real-scale --config (scale: real) only")
        (_, _, info), _ = _load(args)
        print(json.dumps({"artifact": str(info.folder), "status": info.status,
                          "wall_time_s": round(info.wall_time_s, 1),
                          "final_loss": round(info.manifest.get("final_loss", float("nan")), 4)}, indent=2))
        return 0

    return run


@subcommand("eval", help="evaluate a mini-world model: accuracy per family, Avg. Rate, tokens")
def _eval(parser: argparse.ArgumentParser):
    _common(parser)
    parser.add_argument("--n-test", type=int, default=None, help="test samples (default: world n_test)")
    parser.add_argument("--out", default=None, help="write per-sample records to this CSV")
    parser.add_argument("--baseline", choices=BASELINES, default=None,
                        help="evaluate a training-free baseline on the upper bound at --tokens-576 (layer average, "
                             "in units of 576; default 144) instead of a trained model")

    def run(args: argparse.Namespace) -> int:
        if args.baseline and (args.stage != "upper-bound" or args.frozen_lm or args.steps is not None):
            parser.error("--baseline runs on the upper bound: it cannot be combined with --stage atp, "
                         "--frozen-lm or --steps")
        from atp_repro.mini.evaluate import avg_rate, avg_rate_interval, evaluate, pope_metrics
        from atp_repro.mini.experiments import families_above_chance
        from atp_repro.mini.runs import upper_bound

        (model, tok, info), world = _load(args)
        ds = world.dataset("test", n=args.n_test, tokenizer=tok)
        res = evaluate(model, ds, progress=not args.no_progress)
        table = res.by_family()
        if args.stage == "atp" or args.baseline:
            ub_model, _, _ = upper_bound(world, progress=False)
            ub_res = evaluate(ub_model, ds)
            ub = ub_res.by_family()
            table["upper_bound"] = ub["accuracy"]
            low, high = avg_rate_interval(res.records, ub_res.records)
            print(f"Avg. Rate: {avg_rate(table['accuracy'], ub['accuracy']):.4f} "
                  f"(95% paired-bootstrap interval over the test questions: {low:.4f}-{high:.4f})")
            clear = families_above_chance(ub_res)  # elsewhere a rate is a ratio of two guesses
            print(f"Avg. Rate over the families the upper bound answers far above chance ({', '.join(clear)}): "
                  f"{avg_rate(table['accuracy'], ub['accuracy'][clear]):.4f}")
        print(table.to_string(float_format=lambda x: f"{x:.3f}"))
        pope = pope_metrics(res.records)
        if not pope.empty:
            print("existence, POPE metrics (yes_gap = recall - false-positive rate; 0 = answers ignore the image):")
            print(pope.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print(json.dumps(res.tokens(), indent=2))
        if args.out:
            from atp_repro.paths import atomic_write_text

            atomic_write_text(args.out, res.records.to_csv(index=False))
        return 0

    return run
