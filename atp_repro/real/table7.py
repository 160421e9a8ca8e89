"""Supplementary Table 7's Qwen2-VL-7B rows from real-weight evaluations (lmms-eval result files).

The mini world stands in for Qwen2-VL-7B on a CPU; with the real weights, the two rows come from two
lmms-eval runs (``--model atp_qwen2_vl``, :mod:`atp_repro.real.evaluation`): the released model (the
upper bound) and the same model with the ATP modules trained by ``configs/qwen2vl_7b_atp.yaml``.
:func:`qwen2_vl_rows` reads both, computes each benchmark's retention and the Avg. Rate as main Table 1
does (:func:`atp_repro.real.evaluation.retention_table`), takes the Token column from the vision-token
counts the adapter records (its ``token_log`` model argument: a JSON file of each task's mean count; or the
offline harness's result files, which hold them), as the mean over benchmarks, and judges the paper's claim
on the Avg. Rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..paper import Claim
from .evaluation import BENCHMARKS, TABLE7_BENCHMARKS, read_lmms_eval_results, retention_table

UPPER_BOUND_ROW = "Qwen2-VL-7B"
ATP_ROW = "Qwen2-VL-7B + ATP"
# Table 7's benchmark columns for Qwen2-VL (its MMB-EN column is MMBench-EN dev, read as "MMB")
COLUMNS = {name: ("MMB-EN" if name == "MMB" else name) for name in TABLE7_BENCHMARKS}
RETENTION_GOAL = 95.0  # the claim: ATP with a frozen LM keeps >= 95% Avg. Rate (the paper: 96.2%)


@dataclass
class Table7Real:
    """The real-weight rows of Table 7: ``cells`` ``[(row, column, value)]`` in the paper's row and column
    names, ``retention`` (benchmark -> upper bound, ATP, retention %; last row ``Avg. Rate``), the mean
    vision tokens of either side (None where the results record none), and the claim."""

    cells: list[tuple[str, str, float]]
    retention: pd.DataFrame
    tokens: dict[str, float | None]
    claim: Claim
    sources: dict[str, str]


def read_token_log(path: str | Path, what: str = "token_log") -> dict[str, float]:
    """Benchmark -> mean vision tokens from the adapter's ``token_log`` (``{"tasks": {task: {"mean_vision_tokens",
    "requests"}}}``). Without the file itself, the per-rank files of a multi-process run (``<stem>.rank<k><suffix>``)
    are combined, weighted by their requests. Tasks map to benchmarks as :data:`BENCHMARKS` reads them."""
    path = Path(path).expanduser()
    files = [path] if path.is_file() else sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))
    if not files:
        raise FileNotFoundError(f"{what}: {path}: no such token log (nor per-rank files {path.stem}.rank<k>"
                                f"{path.suffix})")
    sums: dict[str, list[float]] = {}
    for file in files:
        try:
            tasks = json.loads(file.read_text(encoding="utf-8"))["tasks"]
            entries = [(task, float(e["mean_vision_tokens"]), int(e["requests"])) for task, e in tasks.items()]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{what}: {file} is not a token log ({err!r}); expected {{'tasks': {{task: "
                             "{'mean_vision_tokens': number, 'requests': int}}}}") from None
        for task, mean, requests in entries:
            total = sums.setdefault(task, [0.0, 0])
            total[0] += mean * requests
            total[1] += requests
    by_task = {task: total / n for task, (total, n) in sums.items() if n}
    out = {}
    for name in TABLE7_BENCHMARKS:
        task = next((t for t in BENCHMARKS[name].tasks if t in by_task), None)
        if task is not None:
            out[name] = by_task[task]
    return out


def _mean(values: dict[str, float]) -> float | None:
    finite = [v for v in values.values() if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def qwen2_vl_rows(ub_results: str | Path, atp_results: str | Path, *, ub_tokens: str | Path | None = None,
                  atp_tokens: str | Path | None = None) -> Table7Real:
    """Table 7's Qwen2-VL-7B rows from the lmms-eval results of the upper bound and of the ATP model.

    Args:
        ub_results: an lmms-eval result file or folder of the released Qwen2-VL-7B (parameter
            ``qwen_ub_results`` of the Table 7 notebook).
        atp_results: the same for Qwen2-VL-7B with ATP (``qwen_atp_results``).
        ub_tokens, atp_tokens: the adapter's ``token_log`` of either run (``qwen_ub_tokens``, ``qwen_atp_tokens``;
            :func:`read_token_log`); None or empty: the counts in the result files, where they hold any.

    Raises:
        ValueError: a path is empty, or the two runs share no Table 7 benchmark.
        FileNotFoundError: a path does not exist (the message names it).
    """
    for name, value in (("qwen_ub_results", ub_results), ("qwen_atp_results", atp_results)):
        if not str(value).strip():
            raise ValueError(f"{name} is empty: give the lmms-eval result file or folder of that run")
    specs = {name: BENCHMARKS[name] for name in TABLE7_BENCHMARKS}
    try:
        ub = read_lmms_eval_results(ub_results, benchmarks=specs)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"qwen_ub_results: {err}") from None
    try:
        atp = read_lmms_eval_results(atp_results, benchmarks=specs)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"qwen_atp_results: {err}") from None
    retention = retention_table(ub, atp, TABLE7_BENCHMARKS)
    averaged = retention.attrs["averaged"]
    if not averaged:
        raise ValueError(f"no Table 7 benchmark ({', '.join(TABLE7_BENCHMARKS)}) has a score in both "
                         f"qwen_ub_results={ub_results} and qwen_atp_results={atp_results}")
    cells: list[tuple[str, str, float]] = []
    for name in averaged:
        cells += [(UPPER_BOUND_ROW, COLUMNS[name], float(retention.loc[name, "upper_bound"])),
                  (ATP_ROW, COLUMNS[name], float(retention.loc[name, "pruned"]))]
    avg_rate = float(retention.attrs["avg_rate"])
    cells.append((ATP_ROW, "Avg. Rate", avg_rate))
    tokens = {}
    for row, scores, log, what in ((UPPER_BOUND_ROW, ub, ub_tokens, "qwen_ub_tokens"),
                                   (ATP_ROW, atp, atp_tokens, "qwen_atp_tokens")):
        per_benchmark = read_token_log(log, what) if log and str(log).strip() else scores.tokens
        tokens[row] = _mean({name: v for name, v in per_benchmark.items() if name in averaged})
    cells += [(row, "Token", value) for row, value in tokens.items() if value is not None]
    missing = retention.attrs["missing"]
    evidence = (f"{avg_rate:.1f}% over {len(averaged)} benchmarks ({', '.join(averaged)})"
                + (f"; not in both runs: {', '.join(missing)}" if missing else "")
                + (f"; {tokens[ATP_ROW]:.0f} of {tokens[UPPER_BOUND_ROW]:.0f} vision tokens"
                   if tokens[ATP_ROW] is not None and tokens[UPPER_BOUND_ROW] is not None else "")
                + " (paper: 96.2% at 256 of 1076; a point estimate: lmms-eval gives no paired interval)")
    claim = Claim(f"ATP with a frozen LM keeps >= {RETENTION_GOAL:.0f}% Avg. Rate on Qwen2-VL-7B (real weights)",
                  avg_rate >= RETENTION_GOAL, evidence)
    return Table7Real(cells, retention, tokens, claim, {"upper_bound": ub.note, "atp": atp.note})
