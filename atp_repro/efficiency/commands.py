"""``atp-repro bench``: time prefill of the Table 3 strategies, or (``--generate N``) end-to-end generation
with the KV cache (loaded by atp_repro.cli's plugin hook)."""

from __future__ import annotations

import argparse

from atp_repro.cli import Handler, subcommand

# BenchConfig field -> command-line flag, so that errors name the argument the user typed.
FLAGS = {"fixed_keep": "--fixed-keep", "average_tokens": "--average-tokens", "strategies": "--strategies",
         "fast_backend": "--fast-backend", "dtype": "--dtype", "device": "--device", "warmup": "--warmup",
         "repeats": "--repeats", "threads": "--threads", "model": "--preset", "baselines": "--baseline",
         "new_tokens": "--generate", "batch_sizes": "--batch-sizes"}


@subcommand("bench", help="time prefill of the supplementary Table 3 strategies (FLOPs, KV bytes, ratios)")
def _bench(parser: argparse.ArgumentParser) -> Handler:
    # Names are validated when the command runs (the error lists them): building the parser must
    # not import torch, or every `atp-repro --help` would pay for it.
    parser.add_argument("--preset", default="cpu",
                        help="timing model shapes: cpu (default), smoke or llava-1.5-7b")
    parser.add_argument("--average-tokens", type=float, default=144.0,
                        help="target vision tokens averaged over all layers (default 144); solved into --fixed-keep")
    parser.add_argument("--fixed-keep", type=int, nargs="+", default=None, metavar="K",
                        help="kept vision tokens per ATP module (one per module; overrides --average-tokens)")
    parser.add_argument("--module-layers", type=int, nargs="+", default=None, metavar="L",
                        help="0-based layers followed by an ATP module (default: the preset's, 4 14 24)")
    parser.add_argument("--strategies", nargs="+", default=None, metavar="NAME",
                        help="strategies to time (default: all five of supplementary Table 3 plus ours)")
    parser.add_argument("--fast-backend", default="auto", help="fast attention kernel: auto, sdpa or flash_attention_2")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where fast, else fp32), bfloat16 or float32")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=None, help="write the per-run rows to this CSV (atomically)")
    parser.add_argument("--tiles", type=int, default=1,
                        help="image tiles of the preset's grid per sample (5 x 576 = 2880 vision tokens; default 1)")
    parser.add_argument("--generate", type=int, default=None, metavar="N",
                        help="time generation instead of prefill: N new tokens with the KV cache (TTFT, decode "
                             "tokens/s, KV bytes, peak memory) for the upper bound, ATP and a text-only floor")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                        help="batch sizes for --generate (default 1 8)")
    parser.add_argument("--baseline", nargs="+", default=(), metavar="METHOD",
                        help="also time training-free baselines at --average-tokens: fastv, pyramiddrop, sparsevlm, "
                             "uniform, random, visionzip, prumerge+")

    def run(args: argparse.Namespace) -> int:
        from atp_repro import paths
        from atp_repro.efficiency.models import PRESETS, timing_model_config
        from atp_repro.efficiency.report import efficiency_metrics
        from atp_repro.efficiency.strategies import STRATEGIES, BenchConfig, BenchConfigError, run_benchmark
        from atp_repro.paper import to_markdown

        if args.preset not in PRESETS:
            raise ValueError(f"argument --preset: {args.preset!r} is not one of {sorted(PRESETS)}")
        output = paths.check_output_file(args.output, "--output") if args.output else None
        if args.fixed_keep is not None and any(k < 0 for k in args.fixed_keep):
            raise ValueError(f"argument --fixed-keep: counts must be >= 0, got {args.fixed_keep}")
        if args.tiles < 1:
            raise ValueError(f"argument --tiles: expected an int >= 1, got {args.tiles}")
        try:
            changes = {} if args.module_layers is None else {"module_layers": tuple(args.module_layers)}
            model = timing_model_config(args.preset, **changes).replace(tiles=args.tiles)
        except ValueError as err:
            raise ValueError(f"argument --module-layers: {err}") from None
        if args.generate is not None:
            return _generation(args, model, output)
        if args.batch_sizes is not None:
            raise ValueError("argument --batch-sizes: applies to --generate only (prefill is timed at batch 1)")
        try:
            config = BenchConfig(model=model, average_tokens=args.average_tokens,
                                 fixed_keep=tuple(args.fixed_keep) if args.fixed_keep else None,
                                 strategies=tuple(args.strategies or STRATEGIES), fast_backend=args.fast_backend,
                                 dtype=args.dtype,
                                 device=args.device, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                 baselines=tuple(args.baseline))
        except BenchConfigError as err:
            raise ValueError(f"argument {FLAGS.get(err.field, err.field)}: {err}") from None
        result = run_benchmark(config, run_id="bench", progress=True)
        columns = ["strategy", "avg_tokens", "median_s", "spread", "overhead_fraction", "flops",
                   "kv_vision_bytes_measured", "layer_backends"]
        print(to_markdown(result.summary[columns]), end="")
        print(to_markdown(efficiency_metrics(result.summary)), end="")
        if args.output:
            path = paths.atomic_write_text(output, result.runs.to_csv(index=False))
            print(f"per-run rows: {path}")
        return 0

    return run


def _generation(args: argparse.Namespace, model, output) -> int:
    from atp_repro import paths
    from atp_repro.efficiency.generation import GenerationConfig, GenerationConfigError, run_generation_benchmark
    from atp_repro.paper import to_markdown

    if args.baseline or args.strategies or args.fixed_keep:
        raise ValueError("argument --generate: times the upper bound, ATP and a text-only floor; --baseline, "
                         "--strategies and --fixed-keep apply to prefill timing only")
    try:
        config = GenerationConfig(model=model, average_tokens=args.average_tokens, new_tokens=args.generate,
                                  batch_sizes=tuple(args.batch_sizes or (1, 8)), dtype=args.dtype, device=args.device,
                                  fast_backend=args.fast_backend, warmup=args.warmup, repeats=args.repeats,
                                  threads=args.threads)
    except GenerationConfigError as err:
        raise ValueError(f"argument {FLAGS.get(err.field, err.field)}: {err}") from None
    result = run_generation_benchmark(config, run_id="bench", progress=True)
    print(to_markdown(result.summary[["batch", "strategy", "avg_vision_tokens", "ttft_median_s", "decode_median_s",
                                      "decode_tokens_per_s", "kv_bytes", "peak_generate_bytes"]]), end="")
    print(to_markdown(result.metrics[["batch", "decode_saving_measured", "decode_saving_predicted",
                                      "measured_over_predicted", "holds", "kv_saving"]]), end="")
    print(result.facts["machine"])
    if output is not None:
        path = paths.atomic_write_text(output, result.runs.to_csv(index=False))
        print(f"per-run rows: {path}")
    return 0
