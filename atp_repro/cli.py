"""Command line: ``atp-repro <subcommand>`` (also ``python -m atp_repro``).

Subcommands register themselves with :func:`subcommand`. To add one, write a function that
configures its argument parser and returns the handler, in ``atp_repro/cli.py`` or in a
``commands`` module of any subpackage (``atp_repro/<pkg>/commands.py`` is imported
automatically)::

    from atp_repro.cli import subcommand

    @subcommand("train", help="train ATP modules from a config")
    def _train(parser):
        parser.add_argument("config")

        def run(args) -> int:
            from atp_repro.mini import train   # import heavy modules inside the handler
            train(args.config)
            return 0

        return run

Handlers return the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["subcommand", "build_parser", "main", "Handler", "Configure"]

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], Handler]


@dataclass(frozen=True)
class _Subcommand:
    name: str
    help: str
    configure: Configure


_REGISTRY: dict[str, _Subcommand] = {}


def subcommand(name: str, *, help: str) -> Callable[[Configure], Configure]:
    """Register ``configure(parser) -> handler`` as ``atp-repro <name>``."""

    def decorate(configure: Configure) -> Configure:
        if name in _REGISTRY and _REGISTRY[name].configure is not configure:
            raise ValueError(f"subcommand {name!r} is registered twice")
        _REGISTRY[name] = _Subcommand(name, help, configure)
        return configure

    return decorate


def _load_plugins() -> None:
    """Import ``atp_repro.<subpackage>.commands`` for every subpackage that has one."""
    import atp_repro

    for info in pkgutil.iter_modules(atp_repro.__path__):
        # Look for the file rather than calling find_spec, which would import the subpackage
        # itself (atp_repro.atp imports torch and transformers).
        if info.ispkg and any(Path(p, info.name, "commands.py").is_file() for p in atp_repro.__path__):
            importlib.import_module(f"atp_repro.{info.name}.commands")


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    try:
        version = metadata.version("atp-repro")
    except metadata.PackageNotFoundError:  # running from a checkout without installing
        version = "unknown"

    parser = argparse.ArgumentParser(
        prog="atp-repro",
        description="Reproducibility package for ATP-LLaVA (adaptive visual-token pruning).",
        epilog="Run 'atp-repro <subcommand> --help' for the options of a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    subparsers = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for name in sorted(_REGISTRY):
        sub = _REGISTRY[name]
        p = subparsers.add_parser(name, help=sub.help, description=sub.help)
        p.set_defaults(_handler=sub.configure(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything imports torch: pinned CPU numerics for this process and every notebook kernel
    # or training process it starts (atp_repro.numerics; ATP_REPRO_NUMERICS=native opts out).
    from atp_repro import numerics

    try:
        numerics.apply()
    except ValueError as err:
        print(f"atp-repro: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        print(f"atp-repro {args.command}: error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# Built-in subcommands
# --------------------------------------------------------------------------------------------


def _add_runner_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NOTEBOOK",
        help="run only these notebooks (stems or file names)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where tables/ and figures/ go, from the repo root ('' = the root itself); "
        "default: the profile's folder",
    )
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a notebook parameter for every notebook (VALUE is parsed as YAML)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run in parallel (default 1)")
    parser.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell")
    parser.add_argument("--log-output", action="store_true", help="stream notebook output")
    parser.add_argument(
        "--clean", action="store_true", help="delete stale executed copies of the profile first"
    )
    parser.add_argument("--list", action="store_true", help="show the plan and exit")


def _run_profile(args: argparse.Namespace, profile: str) -> int:
    import yaml

    from atp_repro import notebook_runner as nr

    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs}: must be >= 1")
    if args.cell_timeout is not None and args.cell_timeout <= 0:
        raise ValueError(f"--cell-timeout={args.cell_timeout}: must be a number of seconds > 0 (omit it for none)")
    overrides = {}
    for name, value in args.parameter:
        try:
            overrides[name] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"-p {name} {value!r}: VALUE is not valid YAML ({' '.join(str(err).split())})") from None
    jobs = nr.plan_runs(profile, only=args.only, output_dir=args.output_dir, overrides=overrides)
    if args.list:
        for job in jobs:
            state = f"skip ({job.skip_reason})" if job.skip_reason else "run"
            print(f"{job.name}: {state}; parameters {json.dumps(dict(job.parameters))}")
        return 0
    if profile == "mini":
        from atp_repro import numerics

        warning = numerics.mkl_not_honoured()
        if warning:
            print(f"atp-repro: warning: {warning}", file=sys.stderr)
    results = nr.run_notebooks(
        jobs,
        jobs_in_parallel=args.jobs,
        cell_timeout=args.cell_timeout,
        log_output=args.log_output,
        clean=args.clean,
    )
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
    total = sum(r.seconds for r in results)
    print(
        f"{profile}: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped "
        f"({nr.format_seconds(total)}); executed copies in {nr.executed_dir(profile)}"
    )
    summary_ok = _summarise_claims({j.parameters[nr.OUTPUT_DIR_PARAM] for j in jobs})
    return 1 if counts["failed"] or not summary_ok else 0


def _summarise_claims(output_dirs: set[Any]) -> bool:
    """Write the claims summary of each output folder's tables/; False if a claims file is bad."""
    from atp_repro import claims_summary, paths

    ok = True
    for output_dir in sorted(output_dirs, key=str):
        tables = paths.output_root(output_dir) / "tables"
        try:
            written = claims_summary.write_summary(tables)
        except claims_summary.ClaimsFileError as err:
            print(f"claims summary: error: {err}", file=sys.stderr)
            ok = False
            continue
        if written:
            print(f"claims summary: {claims_summary.count_line(claims_summary.collect(tables))} -> {written[0]}")
    return ok


@subcommand("run-notebooks", help="execute the notebooks with a parameter profile (papermill)")
def _run_notebooks(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument(
        "--profile",
        choices=["mini", "smoke", "real"],
        default="mini",
        help="mini: committed defaults, writes tables/ and figures/; smoke: small CI parameters; "
        "real: notebooks/params/real/*.yaml for GPU machines (default: mini)",
    )
    _add_runner_options(parser)
    return lambda args: _run_profile(args, args.profile)


@subcommand("reproduce", help="rebuild every table and figure in the mini world (make reproduce)")
def _reproduce(parser: argparse.ArgumentParser) -> Handler:
    _add_runner_options(parser)
    return lambda args: _run_profile(args, "mini")


@subcommand("show-config", help="validate a training config and print the resolved values")
def _show_config(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("config", help="YAML file (relative paths from the repo root)")
    parser.add_argument(
        "--format",
        choices=["yaml", "json", "table"],
        default="yaml",
        help="yaml/json: resolved values; table: every field with its allowed range and meaning",
    )

    def run(args: argparse.Namespace) -> int:
        from atp_repro.training_config import format_value, load_training_config

        cfg = load_training_config(args.config)
        if args.format == "json":
            print(json.dumps(cfg.to_dict(), indent=2))
        elif args.format == "yaml":
            print(f"# {args.config}: valid (fingerprint {cfg.fingerprint()[:12]})")
            print(cfg.to_yaml(), end="")
        else:
            rows = cfg.describe()
            width = max(len(r["key"]) for r in rows)
            for r in rows:
                value = format_value(r["key"], r["value"])
                print(f"{r['key']:<{width}}  {value:<28} {r['allowed']}  -- {r['help']}")
        if cfg.overrides:
            print(f"\n# changes w.r.t. {cfg.inherits}:")
            for o in cfg.overrides:
                old, new = format_value(o.key, o.base_value), format_value(o.key, o.value)
                print(f"#   {o.key}: {old} -> {new}  ({o.reason})")
        return 0

    return run


@subcommand("paper-numbers", help="print the paper's reported numbers (paper/paper_numbers.csv)")
def _paper_numbers(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--artifact", help="e.g. supp_table3 or main_table1 (default: all)")

    def run(args: argparse.Namespace) -> int:
        from atp_repro.paper import load_paper_numbers, to_markdown

        df = load_paper_numbers(args.artifact)
        print(to_markdown(df[["artifact", "row", "column", "value_text", "unit", "notes"]]), end="")
        return 0

    return run


@subcommand("info", help="print git commit, package versions and device (as recorded in runs)")
def _info(parser: argparse.ArgumentParser) -> Handler:
    def run(args: argparse.Namespace) -> int:
        from atp_repro.provenance import environment_info

        info: dict[str, Any] = environment_info()
        print(json.dumps(info, indent=2))
        return 0

    return run


@subcommand("verify", help="compare tables/ with the committed manifest of reproducible results")
def _verify(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--update", action="store_true",
                        help="rewrite tables/MANIFEST.json from the files on disk instead of checking")
    parser.add_argument("--root", default=None, help="repository root to check (default: this checkout)")

    def run(args: argparse.Namespace) -> int:
        from atp_repro import verify

        root = Path(args.root).resolve() if args.root else None
        if args.update:
            print(f"wrote {verify.write_manifest(root)}")
            return 0
        differences = verify.verify(root)
        for d in differences:
            print(d)
        if differences:
            print(f"verify: {len(differences)} difference(s) from the committed results", file=sys.stderr)
            return 1
        print("verify: every result file matches the committed manifest (timings excluded)")
        return 0

    return run


@subcommand("install-git-filter", help="configure the nbstripout git filter in this clone (make hooks)")
def _install_git_filter(parser: argparse.ArgumentParser) -> Handler:
    def run(args: argparse.Namespace) -> int:
        from atp_repro import git_filter

        if git_filter.install():
            print("nbstripout git filter configured: notebooks are committed without outputs")
        else:
            print(f"nbstripout git filter not configured: {git_filter.skip_reason()}")
        return 0

    return run


@subcommand("claims-summary", help="collect every tables/*.claims.csv into tables/claims_summary.md (and .csv)")
def _claims_summary(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--tables", default=None,
                        help="folder holding the *.claims.csv files, from the repo root (default: tables)")

    def run(args: argparse.Namespace) -> int:
        from atp_repro import claims_summary, paths

        tables = paths.resolve(args.tables) if args.tables else paths.repo_root() / "tables"
        if not tables.is_dir():
            raise FileNotFoundError(f"--tables={args.tables}: no such folder ({tables})")
        written = claims_summary.write_summary(tables)
        if not written:
            raise FileNotFoundError(f"--tables: no *.claims.csv files in {tables}")
        print(f"{claims_summary.count_line(claims_summary.collect(tables))}; wrote {', '.join(map(str, written))}")
        return 0

    return run


@subcommand("index", help="write index.ipynb: every notebook with its tables, figures and run times (make lab)")
def _index(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("--record-times", choices=["cold", "warm"], default=None,
                        help="first store the run times of the last make reproduce (tables/*.provenance.json) "
                        "as the cold- or warm-cache times of docs/notebook_run_times.csv")

    def run(args: argparse.Namespace) -> int:
        from atp_repro import index

        if args.record_times:
            print(f"wrote {index.record_run_times(args.record_times)}")
        print(f"wrote {index.write_index()}")
        return 0

    return run
