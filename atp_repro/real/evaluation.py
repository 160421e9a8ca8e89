"""Real-scale evaluation: lmms-eval model adapters for (ATP-)LLaVA and (ATP-)Qwen2-VL, and the paper's retention table.

What
----
* :data:`BENCHMARKS`: the benchmarks of ATP-LLaVA's main Table 1 and of supplementary Table 7's Qwen2-VL
  row, each with the lmms-eval task(s) that run it, the metric key lmms-eval writes for it and the scale
  of that number.
* :func:`read_lmms_eval_results`: scores per benchmark from lmms-eval result files (a file or a folder
  of runs), :func:`retention_table` / :func:`retention_report`: upper-bound score, pruned score,
  retention % and the "Avg. Rate" row (mean over benchmarks of pruned / upper-bound score).
* :func:`load_local_vlm`: a local LLaVA-1.5, Qwen2-VL or Qwen2.5-VL folder (the class read from its
  ``config.json``), optionally with ATP (:func:`load_local_llava`: LLaVA folders only).
* :func:`generate_answers`: answers for ``(context, gen_kwargs, images)`` requests from such a model,
  with or without ATP, recording the vision-token count of each request (the paper's "Token"). The
  prompt is the processor's chat template (:func:`build_prompt`); Qwen2-VL takes every image at its own
  size (dynamic resolution), so requests in one batch can have different token counts.
* :func:`evaluate_benchmark_file`: a tiny offline harness (a JSONL file of questions, exact-match
  scoring) that writes its score in lmms-eval's result-file layout, so that the whole path from model to
  retention table runs without lmms-eval.
* ``ATPLlava`` and ``ATPQwen2VL``: the lmms-eval "simple" models of :data:`LMMS_EVAL_MODELS`
  (``atp_llava`` for LLaVA folders, ``atp_qwen2_vl`` (alias ``atp_qwen2_5_vl``) for Qwen2-VL and
  Qwen2.5-VL folders), defined only when ``lmms_eval`` imports; :func:`register_lmms_eval_model` makes
  ``--model <name>`` resolvable.

Why
---
The paper reports its benchmarks as absolute scores and summarises a pruned model by the mean ratio of
its scores to the unpruned model (the upper bound: LLaVA-1.5 in main Table 1, Qwen2-VL-7B in
supplementary Table 7). lmms-eval runs all seven benchmarks from one command and writes every aggregate
score to a JSON file; reading those files, rather than parsing logs, keeps the table reproducible.
lmms-eval pins its own torch (and torchvision), so it is not installed in this package's CPU
environment: install it with ``pip install lmms-eval`` in a separate environment (with this package
installed there too) and run ``python -m atp_repro.real.evaluation lmms-eval --model atp_llava
--model_args pretrained=<folder>,atp=<folder> --tasks gqa,mme,... --output_path <dir>`` (``--model
atp_qwen2_vl`` for a Qwen2-VL run). Everything except the adapter classes themselves works, and is
tested, without lmms-eval.

Scales: lmms-eval writes accuracies as fractions (GQA 0.62), MMBench already in percent and MME as a
sum of sub-task scores (0-2000 for perception). :func:`read_lmms_eval_results` converts to the paper's
printed scale by default (``scale="paper"``; ``"raw"`` keeps lmms-eval's numbers). Retention does not
depend on the scale as long as both sides use the same one.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from PIL import Image

from ..atp import atp_config, has_atp, load_atp, token_counts
from ..paths import atomic_write_text, check_output_file, resolve
from .loading import MODEL_CLASSES, QWEN_MODEL_TYPES, UnsupportedModelError, check_model_folder, load_vlm, model_type

__all__ = [
    "AVG_RATE",
    "BENCHMARKS",
    "INSTALL_HINT",
    "LLAVA_PROMPT",
    "LMMS_EVAL_MODELS",
    "PAPER_FACTORS",
    "SCALES",
    "TABLE1_BENCHMARKS",
    "TABLE7_BENCHMARKS",
    "Benchmark",
    "BenchmarkRun",
    "BenchmarkScores",
    "Generation",
    "GenerationSettings",
    "build_prompt",
    "evaluate_benchmark_file",
    "exact_match",
    "generate_answers",
    "generate_detailed",
    "generation_settings",
    "load_local_llava",
    "load_local_vlm",
    "main",
    "normalize_answer",
    "read_benchmark_jsonl",
    "read_lmms_eval_results",
    "register_lmms_eval_model",
    "retention_report",
    "retention_table",
]

# --------------------------------------------------------------------------------------------------
# Benchmarks and lmms-eval result files
# --------------------------------------------------------------------------------------------------


class Benchmark(NamedTuple):
    """How one benchmark (of main Table 1 or supplementary Table 7) is read from lmms-eval results.

    Attributes:
        tasks: lmms-eval task names that run it, in order of preference (the first one present with a
            numeric ``metric`` in a result file is used).
        metric: the key in ``results[task]``: ``"<metric>,<filter>"`` (lmms-eval's filter is ``none``
            for all of these tasks).
        scale: what the number means and its range as lmms-eval writes it.
    """

    tasks: tuple[str, ...]
    metric: str
    scale: str


#: Display names follow the columns of the paper's main Table 1, then of supplementary Table 7's Qwen2-VL row
#: (its MMB-EN column is "MMB"); :data:`TABLE1_BENCHMARKS` and :data:`TABLE7_BENCHMARKS` list each table's.
BENCHMARKS: dict[str, Benchmark] = {
    "GQA": Benchmark(("gqa",), "exact_match,none",
                     "fraction 0-1: exact match on testdev-balanced (case and punctuation ignored)"),
    "MMB": Benchmark(("mmbench_en_dev", "mmbench_en_dev_static"), "gpt_eval_score,none",
                     "percent 0-100: MMBench-EN dev circular accuracy (mmbench_en_dev asks a GPT judge for answers "
                     "it cannot match by rule; mmbench_en_dev_static matches by rule only)"),
    "MME": Benchmark(("mme",), "mme_perception_score,none",
                     "points 0-2000: perception score, the sum over 10 sub-tasks of acc + acc+ (the number LLaVA "
                     "papers report; cognition is mme_cognition_score)"),
    "POPE": Benchmark(("pope",), "pope_f1_score,none",
                      "fraction 0-1: F1 of 'yes' over the adversarial, popular and random splits pooled (the "
                      "token-pruning papers report F1; LLaVA-1.5 averages the three per-split F1s)"),
    "SEED": Benchmark(("seedbench",), "seed_image,none",
                      "fraction 0-1: SEED-Bench accuracy on the image questions (seed_all adds the video ones)"),
    "SQA-I": Benchmark(("scienceqa_img",), "exact_match,none",
                       "fraction 0-1: ScienceQA test questions with an image, option-letter accuracy"),
    "VQAv2": Benchmark(("vqav2_val", "vqav2_test"), "exact_match,none",
                       "fraction 0-1: VQA accuracy on val; vqav2_test only writes a submission file for the "
                       "EvalAI test-dev server (the paper's split), whose score must be entered by hand"),
    "DocVQA": Benchmark(("docvqa_val", "docvqa_test"), "anls,none",
                        "fraction 0-1: ANLS on val; docvqa_test only writes a submission file for the evaluation "
                        "server (the test split Qwen2-VL reports), whose score must be entered by hand"),
    "OCRBench": Benchmark(("ocrbench",), "ocrbench_accuracy,none",
                          "fraction 0-1: the final score (points out of 1000, which the paper prints) / 1000"),
    "ChartQA": Benchmark(("chartqa",), "relaxed_overall,none",
                         "fraction 0-1: relaxed accuracy on test, human and augmented questions pooled"),
    "InfoVQA": Benchmark(("infovqa_val", "infovqa_test"), "anls,none",
                         "fraction 0-1: ANLS on val; infovqa_test only writes a submission file for the evaluation "
                         "server (the test split Qwen2-VL reports), whose score must be entered by hand"),
    "AI2D": Benchmark(("ai2d",), "exact_match,none", "fraction 0-1: AI2D test accuracy (the option's letter)"),
    "MMMU-val": Benchmark(("mmmu_val",), "mmmu_acc,none", "fraction 0-1: MMMU validation accuracy"),
}
TABLE1_BENCHMARKS = ("GQA", "MMB", "MME", "POPE", "SEED", "SQA-I", "VQAv2")
#: Supplementary Table 7's columns in its order (AI2D has no Qwen2-VL score there).
TABLE7_BENCHMARKS = ("DocVQA", "OCRBench", "ChartQA", "InfoVQA", "AI2D", "MMMU-val", "MMB")

#: Factor from lmms-eval's number to the number the paper prints (percent for fractions).
PAPER_FACTORS: dict[str, float] = {"GQA": 100.0, "MMB": 1.0, "MME": 1.0, "POPE": 100.0, "SEED": 100.0,
                                   "SQA-I": 100.0, "VQAv2": 100.0, "DocVQA": 100.0, "OCRBench": 1000.0,
                                   "ChartQA": 100.0, "InfoVQA": 100.0, "AI2D": 100.0, "MMMU-val": 100.0}

SCALES = ("paper", "raw")
AVG_RATE = "Avg. Rate"
#: Per-task key under which this module writes the mean vision-token count (the paper's "Token").
TOKENS_KEY = "vision_tokens,none"

INSTALL_HINT = (
    "lmms-eval is not installed in this environment. Install it with `pip install lmms-eval` in a separate "
    "environment (it pulls its own torch and torchvision, which would replace this package's pinned CPU torch), "
    "install atp_repro there as well, then call atp_repro.real.evaluation.register_lmms_eval_model() or run "
    "`python -m atp_repro.real.evaluation lmms-eval --model atp_llava ...` (atp_qwen2_vl for Qwen2-VL / Qwen2.5-VL)."
)

_LAYOUT = ("expected lmms-eval's layout: a JSON object whose 'results' maps each task name to "
           "{'<metric>,<filter>': value, ...}")
_RESULT_NAME = re.compile(r"(^results.*\.json$)|(_results\.json$)")
_STAMP_COMPACT = re.compile(r"(?<!\d)(\d{8})_(\d{6})(?!\d)")
_STAMP_ISO = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2})[-:](\d{2})[-:](\d{2})")


class BenchmarkScores(dict):
    """Benchmark display name -> score (a plain dict for :func:`retention_table`), plus where each came from.

    Attributes:
        source: the file or folder that was read.
        files: benchmark -> the result file its score was taken from.
        superseded: older result files that also held a benchmark (the newest run wins).
        ignored: JSON files with a result-file name that are not lmms-eval result files (e.g. the
            ``submissions/*_results.json`` some tasks write).
        unscored: benchmark -> why its task was present without a numeric score.
        unmatched_tasks: tasks in the files that no benchmark reads.
        tokens: benchmark -> mean vision tokens, where the file records it (:func:`evaluate_benchmark_file`).
        scale: ``"paper"`` or ``"raw"``.
        note: one human-readable summary of the above.
    """

    def __init__(self, scores: Mapping[str, float] = (), *, source: Path | None = None,
                 files: dict[str, Path] | None = None, superseded: list[Path] | None = None,
                 ignored: list[Path] | None = None, unscored: dict[str, str] | None = None,
                 unmatched_tasks: list[str] | None = None, tokens: dict[str, float] | None = None,
                 scale: str = "paper", note: str = "") -> None:
        super().__init__(scores)
        self.source = source
        self.files = files or {}
        self.superseded = superseded or []
        self.ignored = ignored or []
        self.unscored = unscored or {}
        self.unmatched_tasks = unmatched_tasks or []
        self.tokens = tokens or {}
        self.scale = scale
        self.note = note


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _load_result_file(path: Path) -> dict[str, Any]:
    """The parsed file if it is in lmms-eval's result layout; else ValueError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not an lmms-eval result file (cannot read it as JSON: {err}); {_LAYOUT}") from None
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError(f"{path}: not an lmms-eval result file (no top-level 'results'); {_LAYOUT}")
    results = data["results"]
    if not isinstance(results, dict) or not results or not all(isinstance(v, dict) for v in results.values()):
        raise ValueError(f"{path}: not an lmms-eval result file ('results' is not a non-empty mapping of task -> "
                         f"metrics); {_LAYOUT}")
    if not any("," in key for metrics in results.values() for key in metrics):
        raise ValueError(f"{path}: not an lmms-eval result file (no '<metric>,<filter>' keys under 'results'); "
                         f"{_LAYOUT}")
    return data


def _name_timestamp(path: Path, root: Path) -> datetime | None:
    """The run time written in the file name (lmms-eval: ``YYYYMMDD_HHMMSS_results.json``; lm-eval style
    ``results_YYYY-MM-DDTHH-MM-SS.json``) or, failing that, in a folder name below ``root``."""
    parts = [path.name] + [p.name for p in path.parents if p != root and root in p.parents]
    for part in parts:
        if m := _STAMP_COMPACT.search(part):
            try:
                return datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
            except ValueError:
                pass
        if m := _STAMP_ISO.search(part):
            try:
                return datetime.strptime(f"{m.group(1)} {m.group(2)}:{m.group(3)}:{m.group(4)}", "%Y-%m-%d %H:%M:%S")
            except ValueError:
                pass
    return None


def _recency(path: Path, root: Path) -> tuple[datetime, float, str]:
    mtime = path.stat().st_mtime
    return (_name_timestamp(path, root) or datetime.fromtimestamp(mtime), mtime, str(path))


def _find_result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.json") if p.is_file() and _RESULT_NAME.search(p.name)
                  and not p.name.startswith("."))


def read_lmms_eval_results(path: str | Path, benchmarks: Mapping[str, Benchmark] | None = None,
                           scale: str = "paper") -> BenchmarkScores:
    """Scores per benchmark from an lmms-eval result file, or from every result file under a folder.

    Args:
        path: a ``results*.json`` / ``*_results.json`` file (lmms-eval writes
            ``<output_path>/<model>/<YYYYMMDD_HHMMSS>_results.json``), or a folder searched recursively.
        benchmarks: display name -> :class:`Benchmark`; default :data:`BENCHMARKS`.
        scale: ``"paper"`` converts to the paper's printed scale (:data:`PAPER_FACTORS`; names not in it
            are kept as they are), ``"raw"`` keeps lmms-eval's numbers.

    When several runs hold the same benchmark, the newest run wins: newest by the timestamp in the file
    (or folder) name, else by modification time; the others are listed in ``superseded`` and ``note``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file given directly is not an lmms-eval result file (the message names it), a folder
            holds none, or ``scale`` is not one of :data:`SCALES`.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is invalid: expected one of {SCALES}")
    specs = BENCHMARKS if benchmarks is None else benchmarks
    source = resolve(path)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such lmms-eval result file or folder")
    ignored: list[Path] = []
    loaded: list[tuple[Path, dict[str, Any]]] = []
    if source.is_dir():
        for candidate in _find_result_files(source):
            try:
                loaded.append((candidate, _load_result_file(candidate)))
            except ValueError:
                ignored.append(candidate)
        if not loaded:
            extra = f" (not result files: {', '.join(str(p) for p in ignored)})" if ignored else ""
            raise ValueError(f"{source}: no lmms-eval result files (results*.json or *_results.json) in this "
                             f"folder or below{extra}; {_LAYOUT}")
        root = source
    else:
        loaded.append((source, _load_result_file(source)))
        root = source.parent
    loaded.sort(key=lambda item: _recency(item[0], root), reverse=True)  # newest first

    scores: dict[str, float] = {}
    files: dict[str, Path] = {}
    tokens: dict[str, float] = {}
    unscored: dict[str, str] = {}
    superseded: set[Path] = set()
    runs: dict[str, list[Path]] = {}
    read_tasks: set[str] = set()
    for name, spec in specs.items():
        factor = PAPER_FACTORS.get(name, 1.0) if scale == "paper" else 1.0
        for file, data in loaded:
            results = data["results"]
            hit = None
            for task in spec.tasks:
                if task not in results:
                    continue
                read_tasks.add(task)
                value = _number(results[task].get(spec.metric))
                if value is None:
                    unscored.setdefault(name, f"{task} in {file.name}: {spec.metric} = "
                                              f"{results[task].get(spec.metric, 'absent')!r}")
                    continue
                hit = task
                break
            if hit is None:
                continue
            runs.setdefault(name, []).append(file)
            if name in scores:
                superseded.add(file)
                continue
            scores[name] = value * factor
            files[name] = file
            unscored.pop(name, None)
            token_value = _number(results[hit].get(TOKENS_KEY))
            if token_value is not None:
                tokens[name] = token_value
    unmatched = sorted({task for _, data in loaded for task in data["results"]} - read_tasks)

    lines = [f"read {len(loaded)} lmms-eval result file(s) from {source}"]
    for name, used in runs.items():
        if len(used) > 1:
            lines.append(f"{name}: {len(used)} runs, took the newest {used[0]} (superseded: "
                         f"{', '.join(str(p) for p in used[1:])})")
    if unscored:
        lines.append("no numeric score: " + "; ".join(f"{k} ({v})" for k, v in unscored.items()))
    if ignored:
        lines.append("not result files, ignored: " + ", ".join(str(p) for p in ignored))
    if unmatched:
        lines.append("tasks no benchmark reads: " + ", ".join(unmatched))
    return BenchmarkScores(scores, source=source, files=files, superseded=sorted(superseded), ignored=ignored,
                           unscored=unscored, unmatched_tasks=unmatched, tokens=tokens, scale=scale,
                           note="; ".join(lines))


# --------------------------------------------------------------------------------------------------
# Retention table
# --------------------------------------------------------------------------------------------------


def _score_of(scores: Mapping[str, Any], name: str, side: str) -> float:
    value = scores.get(name)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{side}[{name!r}]={value!r} is invalid: expected a number or None")
    return float(value)


def _ordered_names(*sides: Mapping[str, Any]) -> list[str]:
    present = {name for side in sides for name in side}
    ordered = [name for name in BENCHMARKS if name in present]
    for side in sides:
        ordered += [name for name in side if name not in ordered]
    return ordered


def retention_table(upper_bound: Mapping[str, float | None], pruned: Mapping[str, float | None],
                    benchmarks: Sequence[str] | None = None) -> pd.DataFrame:
    """Upper-bound score, pruned score and retention % per benchmark, and the paper's "Avg. Rate" row.

    Args:
        upper_bound: benchmark -> score of the unpruned model (e.g. :func:`read_lmms_eval_results`).
        pruned: benchmark -> score of the pruned model, on the same scale.
        benchmarks: which benchmarks to list, in order; default: every name on either side, :data:`BENCHMARKS`'
            order first.

    Returns:
        A DataFrame indexed by benchmark with columns ``upper_bound``, ``pruned`` and ``retention_%``
        (= 100 * pruned / upper_bound), and a last row ``"Avg. Rate"`` whose ``retention_%`` is the mean
        of the per-benchmark retentions (its score columns are NaN). A benchmark missing (or None / NaN)
        on either side gets a NaN retention, is left out of the mean and is named in
        ``df.attrs["missing"]`` (``df.attrs["missing_from"]`` says which side); an upper bound of 0 gives
        a NaN retention too (``df.attrs["zero_upper_bound"]``). ``df.attrs["averaged"]`` lists the
        benchmarks in the mean and ``df.attrs["avg_rate"]`` is the mean itself.
    """
    if benchmarks is None:
        names = _ordered_names(upper_bound, pruned)
    else:
        names = list(benchmarks)
        bad = [n for n in names if not isinstance(n, str) or n == AVG_RATE]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"benchmarks={list(benchmarks)!r} is invalid: expected distinct benchmark names "
                             f"(not {AVG_RATE!r}), e.g. {list(BENCHMARKS)}")
    rows: list[tuple[float, float, float]] = []
    missing_from: dict[str, str] = {}
    zero: list[str] = []
    averaged: list[str] = []
    for name in names:
        ub, pr = _score_of(upper_bound, name, "upper_bound"), _score_of(pruned, name, "pruned")
        gone = [side for side, value in (("upper_bound", ub), ("pruned", pr)) if math.isnan(value)]
        if gone:
            missing_from[name] = " and ".join(gone)
            retention = math.nan
        elif ub == 0:
            zero.append(name)
            retention = math.nan
        else:
            retention = 100.0 * pr / ub
            averaged.append(name)
        rows.append((ub, pr, retention))
    rates = [rows[names.index(name)][2] for name in averaged]
    avg = sum(rates) / len(rates) if rates else math.nan
    rows.append((math.nan, math.nan, avg))
    df = pd.DataFrame(rows, columns=["upper_bound", "pruned", "retention_%"],
                      index=pd.Index([*names, AVG_RATE], name="benchmark"))
    df.attrs.update(missing=list(missing_from), missing_from=missing_from, zero_upper_bound=zero, averaged=averaged,
                    avg_rate=avg)
    return df


def retention_report(ub_path: str | Path, pruned_path: str | Path, out_csv: str | Path | None = None, *,
                     benchmarks: Sequence[str] | None = None, scale: str = "paper") -> pd.DataFrame:
    """:func:`retention_table` of two lmms-eval result files or folders, optionally written as CSV.

    Relative paths are resolved from the repository root (as everywhere in this package). The output
    file is checked before anything is read and written atomically. ``df.attrs`` also holds ``sources``
    (the notes of both reads) and ``tokens`` (mean vision tokens per benchmark, where recorded).
    """
    target = check_output_file(out_csv, "out_csv") if out_csv is not None else None
    ub = read_lmms_eval_results(ub_path, scale=scale)
    pruned = read_lmms_eval_results(pruned_path, scale=scale)
    df = retention_table(ub, pruned, benchmarks)
    df.attrs["sources"] = {"upper_bound": ub.note, "pruned": pruned.note}
    df.attrs["tokens"] = {"upper_bound": dict(ub.tokens), "pruned": dict(pruned.tokens)}
    if target is not None:
        atomic_write_text(target, df.to_csv())
    return df


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

#: LLaVA-1.5's conversation format, used when a LLaVA processor has no chat template.
LLAVA_PROMPT = "USER: {images}{context} ASSISTANT:"
LLAVA_IMAGE_TOKEN = "<image>"  # also the image mark of lmms-eval task contexts
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava_hf default when a task sets none


@dataclass(frozen=True)
class GenerationSettings:
    """The generation options this module honours, from lmms-eval's ``gen_kwargs``.

    Sampling happens only if ``temperature > 0`` and ``do_sample`` is not False; ``temperature == 0``
    is greedy (lmms-eval's convention). ``until`` strings cut the decoded answer at their first match.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    do_sample: bool = False
    top_p: float | None = None
    num_beams: int = 1
    until: tuple[str, ...] = ()


def generation_settings(gen_kwargs: Mapping[str, Any] | None) -> GenerationSettings:
    """Validate lmms-eval ``gen_kwargs`` into :class:`GenerationSettings`.

    Other keys (``image_aspect_ratio``, ...) are options of other model implementations and are ignored.
    ``top_p: 0`` (OCRBench's task sets it beside ``temperature: 0``) is accepted for greedy decoding, where
    ``top_p`` has no effect.
    """
    kw = dict(gen_kwargs or {})
    max_new = kw.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"gen_kwargs['max_new_tokens']={max_new!r} is invalid: expected an int >= 1")
    temperature = kw.get("temperature", 0.0)
    temperature = 0.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"gen_kwargs['temperature']={temperature!r} is invalid: expected a number >= 0 "
                         "(0 = greedy)")
    do_sample = kw.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"gen_kwargs['do_sample']={do_sample!r} is invalid: expected true, false or absent")
    num_beams = kw.get("num_beams", 1)
    num_beams = 1 if num_beams is None else num_beams
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"gen_kwargs['num_beams']={num_beams!r} is invalid: expected an int >= 1")
    top_p = kw.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1):
        raise ValueError(f"gen_kwargs['top_p']={top_p!r} is invalid: expected a number in [0, 1] or None (0 only "
                         "with greedy decoding)")
    until = kw.get("until", ())
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs['until']={until!r} is invalid: expected a string or a list of strings")
    sample = temperature > 0 and do_sample is not False
    if sample and top_p == 0:
        raise ValueError("gen_kwargs['top_p']=0 is invalid when sampling (temperature > 0): expected a number in "
                         "(0, 1] or None")
    return GenerationSettings(max_new_tokens=max_new, temperature=float(temperature), do_sample=sample,
                              top_p=None if top_p is None else float(top_p), num_beams=num_beams,
                              until=tuple(s for s in until if s))


def build_prompt(processor: Any, context: str, num_images: int) -> str:
    """The prompt for one request.

    With a chat template (LLaVA-1.5-hf's, Qwen2-VL-Instruct's): one user turn holding one image entry per
    image, then the context, rendered with ``add_generation_prompt=True``; Qwen2-VL's template writes each
    image as ``<|vision_start|><|image_pad|><|vision_end|>``, which the processor expands to as many
    ``<|image_pad|>`` tokens as that image's grid gives. Without one (LLaVA only):
    ``"USER: <image>\\n{context} ASSISTANT:"`` (:data:`LLAVA_PROMPT`).

    Images are put before the context unless the context already holds the processor's image token (as
    lmms-eval's llava_hf does). For a processor whose image token is not ``<image>`` (Qwen2-VL), the
    ``<image>`` marks some task contexts carry are removed first, as lmms-eval's qwen2_vl does.

    Raises:
        ValueError: the processor is not LLaVA's and has no chat template (there is no fallback format).
    """
    image_token = getattr(processor, "image_token", None) or LLAVA_IMAGE_TOKEN
    if image_token != LLAVA_IMAGE_TOKEN:
        context = context.replace(LLAVA_IMAGE_TOKEN, "")
    add_images = num_images > 0 and image_token not in context
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * (num_images if add_images else 0) + [{"type": "text", "text": context}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    if image_token != LLAVA_IMAGE_TOKEN:
        raise ValueError(f"processor={type(processor).__name__} has no chat_template: only a LLaVA processor (image "
                         f"token {LLAVA_IMAGE_TOKEN!r}) has a fallback prompt format; use the model folder's own "
                         "processor (Qwen2-VL-Instruct's holds its chat template)")
    images = " ".join([image_token] * num_images) + "\n" if add_images else ""
    return LLAVA_PROMPT.format(images=images, context=context)


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    cut = min((text.find(s) for s in until if s in text), default=len(text))
    return text[:cut].strip()


@dataclass(frozen=True)
class Generation:
    """One answer and its vision-token count.

    ``vision_tokens`` is, with ATP, the request's vision tokens averaged over all decoder layers in the
    prefill (its row of ``token_counts(model)``: the paper's "Token"); without ATP the number of image
    tokens in its prompt (the same in every layer; with Qwen2-VL's dynamic resolution the sum over its
    images of each image's own count); 0 for a request without images; None if the model config names no
    image token.
    """

    text: str
    vision_tokens: float | None


def _check_requests(requests: Sequence[tuple[str, Mapping[str, Any] | None, Sequence[Any]]]) -> list[tuple]:
    checked = []
    for i, request in enumerate(requests):
        if not isinstance(request, (tuple, list)) or len(request) != 3:
            raise ValueError(f"requests[{i}] is invalid: expected a (context, gen_kwargs, images) triple")
        context, gen_kwargs, images = request
        if not isinstance(context, str):
            raise ValueError(f"requests[{i}] context={context!r} is invalid: expected a string")
        images = list(images or [])
        for image in images:
            if not isinstance(image, Image.Image):
                raise ValueError(f"requests[{i}] has an image of type {type(image).__name__}: expected PIL images "
                                 "(video requests are not supported)")
        checked.append((context, generation_settings(gen_kwargs), images))
    return checked


def _batches(checked: list[tuple], batch_size: int) -> list[list[int]]:
    """Consecutive requests with the same settings (and all with or all without images), at most batch_size."""
    groups: list[list[int]] = []
    for i, (_, settings, images) in enumerate(checked):
        if groups:
            last = groups[-1]
            _, first_settings, first_images = checked[last[0]]
            if len(last) < batch_size and settings == first_settings and bool(images) == bool(first_images):
                last.append(i)
                continue
        groups.append([i])
    return groups


def _vision_tokens(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   num_requests: int, with_images: bool) -> list[float | None]:
    """Per request of one ``generate`` call: :attr:`Generation.vision_tokens`.

    ``input_ids``, ``attention_mask``: (B, L) prompts (B = ``num_requests`` x beams). ``with_images``: the
    batch had images (else ATP ran no pass with images and has no record of this batch)."""
    if has_atp(model) and with_images:
        # (B, num_layers): each row its own sample's tokens per layer, whatever its images' sizes
        counts = token_counts(model).float()
        if counts.shape[0] % num_requests == 0:  # num_beams > 1 repeats each request's rows
            return [float(v) for v in counts.reshape(num_requests, -1).mean(dim=1)]
        return [float(counts.mean())] * num_requests
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        return [None] * num_requests
    is_image = input_ids == image_token_id
    if attention_mask is not None:
        is_image &= attention_mask.bool()
    return [float(v) for v in is_image.sum(dim=1)]


def _stop_ids(model: torch.nn.Module, eos: int | None) -> int | list[int] | None:
    """The tokenizer's end-of-sequence id, plus the ones the model's generation config names (Qwen2-VL-Instruct
    ends a turn with ``<|im_end|>`` and also stops at ``<|endoftext|>``); one id stays a plain int."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    ids = ([] if eos is None else [eos]) + [i for i in configured if i != eos]
    return None if not ids else ids[0] if len(ids) == 1 else ids


def generate_detailed(model: torch.nn.Module, processor: Any,
                      requests: Sequence[tuple[str, Mapping[str, Any] | None, Sequence[Image.Image]]],
                      batch_size: int = 1) -> list[Generation]:
    """:func:`generate_answers` with each answer's vision-token count (:class:`Generation`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an int >= 1")
    checked = _check_requests(requests)
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad
    eos = _stop_ids(model, eos)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out: list[Generation | None] = [None] * len(checked)
    for group in _batches(checked, batch_size):
        settings = checked[group[0]][1]
        prompts = [build_prompt(processor, checked[i][0], len(checked[i][2])) for i in group]
        images = [image for i in group for image in checked[i][2]]
        call: dict[str, Any] = {"text": prompts, "return_tensors": "pt"}
        if images:
            call["images"] = images
        if len(group) > 1:
            call.update(padding=True, padding_side="left")
        # LLaVA: input_ids, attention_mask, pixel_values (N, 3, H, W); Qwen2-VL also image_grid_thw (N, 3) and
        # mm_token_type_ids (B, L), its pixel_values the patches of all images (sum of t h w, patch dim)
        inputs = processor(**call)
        inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        options: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
                                   "num_beams": settings.num_beams}
        if settings.do_sample:
            options["temperature"] = settings.temperature
            if settings.top_p is not None:
                options["top_p"] = settings.top_p
        if pad is not None:
            options["pad_token_id"] = pad
        if eos is not None:
            options["eos_token_id"] = eos
        with torch.inference_mode():
            sequences = model.generate(**inputs, **options)
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        counts = _vision_tokens(model, inputs["input_ids"], inputs.get("attention_mask"), len(group), bool(images))
        for i, text, count in zip(group, texts, counts):
            out[i] = Generation(_cut_at_stop(text, settings.until), count)
    return out  # type: ignore[return-value]


def generate_answers(model: torch.nn.Module, processor: Any,
                     requests: Sequence[tuple[str, Mapping[str, Any] | None, Sequence[Image.Image]]],
                     batch_size: int = 1) -> list[str]:
    """Answer ``(context, gen_kwargs, images)`` requests with a (possibly ATP) LLaVA or Qwen2-VL model.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration``, stock or after :func:`atp_repro.atp.apply_atp` (ATP on
            Qwen2-VL decodes one sequence per request: ``num_beams`` 1).
        processor: its processor (:func:`load_local_vlm` returns both); Qwen2-VL's processes each image at
            its own size.
        requests: per request the question text (lmms-eval's context), lmms-eval generation kwargs
            (``max_new_tokens``, ``temperature`` (0 = greedy), ``do_sample``, ``top_p``, ``num_beams``,
            ``until``; see :func:`generation_settings`) and its PIL images.
        batch_size: requests per ``generate`` call (consecutive requests with equal settings; left padding).

    The prompt is :func:`build_prompt`'s. Answers are decoded without special tokens, cut at the first
    ``until`` string and stripped. :func:`generate_detailed` also returns the vision-token counts.
    """
    return [g.text for g in generate_detailed(model, processor, requests, batch_size)]


# --------------------------------------------------------------------------------------------------
# Offline harness: a JSONL benchmark, exact match, an lmms-eval-layout result file
# --------------------------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_HARNESS_GEN_KWARGS: dict[str, Any] = {"max_new_tokens": 16, "temperature": 0, "do_sample": False,
                                              "num_beams": 1}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, runs of white space collapsed to one space, ends stripped."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """True if the normalised prediction equals a normalised reference answer."""
    references = [answers] if isinstance(answers, str) else list(answers)
    return normalize_answer(prediction) in {normalize_answer(a) for a in references}


def read_benchmark_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Items ``{"id", "image", "question", "answer"}`` (answer: a string or a list of accepted strings),
    one JSON object per line; blank lines are skipped. ValueError names the file and line of a bad item."""
    source = resolve(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such benchmark JSONL file")
    items = []
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{lineno}: not a JSON object ({err})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{source}:{lineno}: expected a JSON object with id, image, question, answer")
        absent = [key for key in ("id", "image", "question", "answer") if key not in item]
        if absent:
            raise ValueError(f"{source}:{lineno}: missing key(s) {absent}; each line needs id, image, question, "
                             "answer")
        answer = item["answer"]
        if not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                            and all(isinstance(a, str) for a in answer))):
            raise ValueError(f"{source}:{lineno}: answer={answer!r} is invalid: expected a string or a non-empty "
                             "list of strings")
        if not isinstance(item["question"], str) or not isinstance(item["image"], str):
            raise ValueError(f"{source}:{lineno}: question and image must be strings (image: a file name relative "
                             "to image_folder)")
        items.append(item)
    if not items:
        raise ValueError(f"{source}: no items (expected one JSON object per line)")
    return items


@dataclass(frozen=True)
class BenchmarkRun:
    """What :func:`evaluate_benchmark_file` did. ``score`` is the exact-match accuracy as a fraction 0-1
    (lmms-eval's scale); ``vision_tokens`` the mean of the requests' :attr:`Generation.vision_tokens`."""

    task: str
    score: float
    vision_tokens: float | None
    num_samples: int
    results_path: Path
    samples_path: Path
    predictions: tuple[str, ...] = field(default=())


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stderr(values: Sequence[float]) -> float | str:
    n = len(values)
    if n < 2:
        return "N/A"  # as lmms-eval writes it
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def evaluate_benchmark_file(model: torch.nn.Module, processor: Any, jsonl_path: str | Path,
                            image_folder: str | Path, task_name: str, out_dir: str | Path, *,
                            gen_kwargs: Mapping[str, Any] | None = None, post_prompt: str = "",
                            batch_size: int = 1, limit: int | None = None) -> BenchmarkRun:
    """Answer a JSONL benchmark, score exact match and write ``out_dir/<task_name>_results.json``.

    The result file has lmms-eval's layout (``results[task]["exact_match,none"]``, its stderr,
    ``"vision_tokens,none"``, plus ``configs``, ``versions``, ``n-samples``, ``higher_is_better``), so
    :func:`read_lmms_eval_results` reads it; name the task after an lmms-eval task whose metric is
    ``exact_match,none`` (``gqa``, ``scienceqa_img``, ``vqav2_val``, ``ai2d``) to have it land in that
    benchmark's row. Per-item predictions go to ``out_dir/<task_name>_samples.jsonl``. Both files are
    written atomically.

    Args:
        image_folder: folder the items' ``image`` names are relative to (absolute names are kept).
        gen_kwargs: lmms-eval style generation kwargs; default greedy, 16 new tokens (GQA's setting).
        post_prompt: text appended to every question (e.g. lmms-eval's "\\nAnswer the question using a
            single word or phrase.").
        limit: evaluate only the first ``limit`` items.
    """
    if not isinstance(task_name, str) or not _TASK_NAME.match(task_name):
        raise ValueError(f"task_name={task_name!r} is invalid: expected letters, digits, '_', '.', '-' "
                         "(it names the output files), e.g. 'gqa'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} is invalid: expected None or an int >= 1")
    kwargs = dict(DEFAULT_HARNESS_GEN_KWARGS if gen_kwargs is None else gen_kwargs)
    generation_settings(kwargs)  # fail before loading any image
    source = resolve(jsonl_path)
    items = read_benchmark_jsonl(source)
    total = len(items)
    items = items[:limit] if limit is not None else items
    folder = resolve(image_folder)
    requests = []
    for item in items:
        image_path = Path(item["image"]) if Path(item["image"]).is_absolute() else folder / item["image"]
        if not image_path.is_file():
            raise FileNotFoundError(f"{image_path}: image of item id={item['id']!r} in {source} not found")
        with Image.open(image_path) as image:
            requests.append((item["question"] + post_prompt, kwargs, [image.convert("RGB")]))
    generations = generate_detailed(model, processor, requests, batch_size)
    correct = [float(exact_match(g.text, item["answer"])) for g, item in zip(generations, items)]
    counted = [g.vision_tokens for g in generations if g.vision_tokens is not None]
    score = sum(correct) / len(correct)
    tokens = _mean(counted)

    results = {"alias": task_name, "exact_match,none": score, "exact_match_stderr,none": _stderr(correct),
               TOKENS_KEY: tokens, "samples": len(items)}
    atp = atp_config(model).to_dict() if has_atp(model) else None
    document = {
        "results": {task_name: results},
        "group_subtasks": {task_name: []},
        "configs": {task_name: {"task": task_name, "dataset_path": str(source), "test_split": "jsonl",
                                "output_type": "generate_until", "generation_kwargs": kwargs,
                                "post_prompt": post_prompt,
                                "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                 "higher_is_better": True, "ignore_case": True,
                                                 "ignore_punctuation": True}]}},
        "versions": {task_name: 0.0},
        "n-shot": {task_name: 0},
        "higher_is_better": {task_name: {"exact_match": True}},
        "n-samples": {task_name: {"original": total, "effective": len(items)}},
        "model_name": str(getattr(model, "name_or_path", "") or ""),
        "model_args": {"atp": atp},
        "date": datetime.now().isoformat(timespec="seconds"),
        "harness": "atp_repro.real.evaluation.evaluate_benchmark_file",
    }
    out = resolve(out_dir)
    results_path = out / f"{task_name}_results.json"
    samples_path = out / f"{task_name}_samples.jsonl"
    samples = [{"id": item["id"], "question": item["question"], "answer": item["answer"], "prediction": g.text,
                "exact_match": c, "vision_tokens": g.vision_tokens}
               for item, g, c in zip(items, generations, correct)]
    atomic_write_text(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic_write_text(results_path, json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return BenchmarkRun(task=task_name, score=score, vision_tokens=tokens, num_samples=len(items),
                        results_path=results_path, samples_path=samples_path,
                        predictions=tuple(g.text for g in generations))


# --------------------------------------------------------------------------------------------------
# Loading and the lmms-eval adapters
# --------------------------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_local_vlm(pretrained: str | Path, *, atp: str | Path | None = None, dtype: str = "auto",
                   attn_implementation: str | None = None, device: str | torch.device = "cpu",
                   model_types: Sequence[str] = tuple(MODEL_CLASSES)):
    """``(model, processor)`` from a local HF folder (``local_files_only``: nothing is downloaded), the model
    of the class its ``config.json`` names (:func:`atp_repro.real.loading.load_vlm`: LLaVA-1.5, Qwen2-VL,
    Qwen2.5-VL), in eval mode on ``device``, with ATP applied from ``atp`` (a folder holding
    ``atp_config.json`` and ``atp_modules.pt``; the ``pretrained`` folder itself for a trained run's output
    folder or a :func:`atp_repro.atp.save_atp_pretrained` checkpoint) if given.

    Args:
        dtype: one of :data:`DTYPES` (``auto``: the dtype the checkpoint was saved in).
        model_types: the ``config.json`` model types accepted, a subset of
            :data:`atp_repro.real.loading.MODEL_CLASSES`; a folder of another type fails before any weights
            are read, naming its type and the accepted ones.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {DTYPES}")
    types = tuple(model_types)
    if not types or any(t not in MODEL_CLASSES for t in types):
        raise ValueError(f"model_types={types!r} is invalid: expected a non-empty subset of {tuple(MODEL_CLASSES)}")
    model, processor = load_vlm(pretrained, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                attn_implementation=attn_implementation or None, what="pretrained", supported=types)
    model.to(device).eval()
    if atp:
        load_atp(model, Path(atp).expanduser())
        model.eval()
    return model, processor


def load_local_llava(pretrained: str | Path, *, atp: str | Path | None = None, dtype: str = "auto",
                     attn_implementation: str | None = None, device: str | torch.device = "cpu"):
    """:func:`load_local_vlm` for a LLaVA folder only; a folder of another model type fails naming it."""
    return load_local_vlm(pretrained, atp=atp, dtype=dtype, attn_implementation=attn_implementation, device=device,
                          model_types=("llava",))


#: lmms-eval model name -> the ``config.json`` model types it serves: one name per model family, as
#: lmms-eval's own models are (``llava_hf``, ``qwen2_vl``, ``qwen2_5_vl``). The class is read from the
#: folder, so both Qwen names serve Qwen2-VL and Qwen2.5-VL folders.
LMMS_EVAL_MODELS: dict[str, tuple[str, ...]] = {
    "atp_llava": ("llava",),
    "atp_qwen2_vl": QWEN_MODEL_TYPES,
    "atp_qwen2_5_vl": QWEN_MODEL_TYPES,
}
_ADAPTER_CLASSES = {"atp_llava": "ATPLlava", "atp_qwen2_vl": "ATPQwen2VL", "atp_qwen2_5_vl": "ATPQwen2VL"}


def _served_model_type(name: str, pretrained: str | Path) -> str:
    """The ``config.json`` model type of the folder ``pretrained`` if the lmms-eval model ``name`` serves it;
    else :class:`~atp_repro.real.loading.UnsupportedModelError` naming the folder's type and the ``--model``
    that serves it (checked before any weights are read)."""
    kind = model_type(check_model_folder(pretrained, what="pretrained"), what="pretrained")
    if kind not in LMMS_EVAL_MODELS[name]:
        serving = next(n for n, kinds in LMMS_EVAL_MODELS.items() if kind in kinds)
        raise UnsupportedModelError(f"--model {name} serves model_type {', '.join(map(repr, LMMS_EVAL_MODELS[name]))}"
                                    f"; pretrained={pretrained!s} has model_type {kind!r}: use --model {serving}")
    return kind


def _flatten_visuals(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    flat: list[Any] = []
    for v in visuals:
        flat += _flatten_visuals(v)
    return flat


def _canonical_module() -> str:
    return "atp_repro.real.evaluation" if __name__ == "__main__" else __name__


try:
    from lmms_eval.api.model import lmms as _LmmsBase
    from lmms_eval.api.registry import register_model as _register_model
except ImportError as _err:  # lmms-eval lives in its own environment (it pins its own torch)
    _LMMS_EVAL_IMPORT_ERROR: ImportError | None = _err
else:
    _LMMS_EVAL_IMPORT_ERROR = None

    class _ATPAdapter(_LmmsBase):
        """An lmms-eval "simple" model on a local HF folder of one model family, optionally with ATP.

        Model args (``--model_args key=value,...``): ``pretrained`` (folder), ``atp`` (ATP folder, may be
        ``pretrained`` itself), ``dtype`` (auto, float32, bfloat16, float16), ``attn_implementation``,
        ``batch_size``, ``device``, ``token_log`` (a JSON file that receives the mean vision-token count
        per task after each call: the paper's "Token"). Only ``generate_until`` is implemented.
        """

        adapter_name = ""  # the --model name (a key of LMMS_EVAL_MODELS), set by each subclass
        is_simple = True

        def __init__(self, pretrained: str, atp: str | None = None, dtype: str = "auto",
                     attn_implementation: str | None = None, batch_size: int | str = 1, device: str | None = None,
                     token_log: str | None = None, **kwargs: Any) -> None:
            super().__init__()
            name = self.adapter_name
            unknown = sorted(k for k, v in kwargs.items() if v is not None and k != "max_batch_size")
            if unknown:
                raise ValueError(f"{name} got unknown model_args {unknown}; allowed: pretrained, atp, dtype, "
                                 "attn_implementation, batch_size, device, token_log")
            try:
                self._batch_size = int(batch_size)
            except (TypeError, ValueError):
                raise ValueError(f"batch_size={batch_size!r} is invalid: expected an int >= 1") from None
            if self._batch_size < 1:
                raise ValueError(f"batch_size={batch_size!r} is invalid: expected an int >= 1")
            _served_model_type(name, pretrained)
            from accelerate import Accelerator

            accelerator = Accelerator()
            if accelerator.num_processes > 1:
                self._device = accelerator.device
                self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            else:
                self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.accelerator = accelerator
            self._model, self._processor = load_local_vlm(pretrained, atp=atp or None, dtype=dtype,
                                                          attn_implementation=attn_implementation,
                                                          device=self._device, model_types=LMMS_EVAL_MODELS[name])
            self.pretrained = str(pretrained)
            self.token_log = Path(token_log).expanduser() if token_log else None
            self.vision_tokens: dict[str, list[float]] = {}

        @property
        def model(self) -> torch.nn.Module:
            return self._model

        @property
        def processor(self) -> Any:
            return self._processor

        @property
        def tokenizer(self) -> Any:
            return self._processor.tokenizer

        @property
        def batch_size(self) -> int:
            return self._batch_size

        @property
        def device(self) -> torch.device:
            return self._device

        def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            raise NotImplementedError(f"{self.adapter_name} implements generate_until only: the paper's benchmark "
                                      "tasks (gqa, mmbench_en_dev, mme, pope, seedbench, scienceqa_img, vqav2_val) "
                                      "are all generate_until tasks; loglikelihood tasks such as seedbench_ppl are "
                                      "not supported")

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError(f"{self.adapter_name} does not implement multi-round generation")

        def generate_until(self, requests: list) -> list[str]:
            built, tasks = [], []
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in (req.args for req in requests):
                doc = self.task_dict[task][split][doc_id]
                visuals = _flatten_visuals(doc_to_visual(doc) if doc_to_visual is not None else None)
                built.append((context, gen_kwargs, visuals))
                tasks.append(task)
            generations = generate_detailed(self._model, self._processor, built, batch_size=self._batch_size)
            for task, g in zip(tasks, generations):
                if g.vision_tokens is not None:
                    self.vision_tokens.setdefault(task, []).append(g.vision_tokens)
            self._write_token_log()
            return [g.text for g in generations]

        def _write_token_log(self) -> None:
            if self.token_log is None:
                return
            path = self.token_log
            if self.world_size > 1:
                path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
            summary = {task: {"mean_vision_tokens": sum(v) / len(v), "requests": len(v)}
                       for task, v in self.vision_tokens.items() if v}
            atomic_write_text(path, json.dumps({"model": self.pretrained, "tasks": summary}, indent=2) + "\n")

    @_register_model("atp_llava")
    class ATPLlava(_ATPAdapter):
        """lmms-eval model ``atp_llava``: a local HF LLaVA folder (``llava-hf/llava-1.5-7b-hf``'s layout),
        optionally with ATP; model args as for every adapter (see ``_ATPAdapter``)."""

        adapter_name = "atp_llava"

    @_register_model("atp_qwen2_vl", "atp_qwen2_5_vl")
    class ATPQwen2VL(_ATPAdapter):
        """lmms-eval model ``atp_qwen2_vl`` (alias ``atp_qwen2_5_vl``): a local HF Qwen2-VL or Qwen2.5-VL folder
        (``Qwen/Qwen2-VL-7B-Instruct``'s layout), optionally with ATP; prompts with the processor's chat
        template, each image at its own size (the folder's processor settings, as at training); model args
        as for every adapter (see ``_ATPAdapter``)."""

        adapter_name = "atp_qwen2_vl"


def register_lmms_eval_model(name: str = "atp_llava") -> type:
    """Make every ``--model`` name of :data:`LMMS_EVAL_MODELS` resolvable in this process and return the
    class of ``name`` (``ATPLlava`` by default).

    The classes register themselves with ``lmms_eval.api.registry.register_model`` when this module is
    imported; the command-line lookup of current lmms-eval goes through ``lmms_eval.models``' manifest
    registry (older versions: its ``AVAILABLE_MODELS`` table), so they are added there too.

    Raises:
        ValueError: ``name`` is not one of :data:`LMMS_EVAL_MODELS`.
        ImportError: lmms-eval is not installed (the message says how to install it).
    """
    if name not in LMMS_EVAL_MODELS:
        raise ValueError(f"name={name!r} is invalid: expected one of {tuple(LMMS_EVAL_MODELS)}")
    if _LMMS_EVAL_IMPORT_ERROR is not None:
        raise ImportError(INSTALL_HINT) from _LMMS_EVAL_IMPORT_ERROR
    adapter = globals()[_ADAPTER_CLASSES[name]]
    try:
        import lmms_eval.models as lmms_models
    except ImportError:
        return adapter
    paths = {model_id: f"{_canonical_module()}.{_ADAPTER_CLASSES[model_id]}" for model_id in LMMS_EVAL_MODELS}
    order = [model_id for model_id in LMMS_EVAL_MODELS if model_id != name] + [name]  # the requested one last
    registry = getattr(lmms_models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        from lmms_eval.models.registry_v2 import ModelManifest

        for model_id in order:
            registry.register_manifest(ModelManifest(model_id=model_id, simple_class_path=paths[model_id]),
                                       overwrite=True)
    elif isinstance(getattr(lmms_models, "AVAILABLE_MODELS", None), dict):
        lmms_models.AVAILABLE_MODELS.update({model_id: paths[model_id] for model_id in order})
    return adapter


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``retention UB PRUNED [--out CSV] [--scale paper|raw]`` prints the retention table;
    ``lmms-eval <lmms-eval arguments>`` runs lmms-eval's command line with the models of
    :data:`LMMS_EVAL_MODELS` (``atp_llava``, ``atp_qwen2_vl``, ...) registered."""
    import argparse

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "lmms-eval":
        try:
            register_lmms_eval_model()
        except ImportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        from lmms_eval.__main__ import cli_evaluate

        sys.argv = ["lmms-eval", *args[1:]]
        cli_evaluate()
        return 0
    parser = argparse.ArgumentParser(prog="python -m atp_repro.real.evaluation",
                                     description="Retention table from lmms-eval results, or lmms-eval with "
                                                 f"{', '.join(LMMS_EVAL_MODELS)} registered (`lmms-eval ...`).")
    sub = parser.add_subparsers(dest="command", required=True)
    ret = sub.add_parser("retention", help="upper-bound vs pruned scores, retention %% and Avg. Rate")
    ret.add_argument("upper_bound", help="lmms-eval result file or folder of the unpruned model")
    ret.add_argument("pruned", help="lmms-eval result file or folder of the pruned model")
    ret.add_argument("--out", default=None, help="write the table as CSV (atomically)")
    ret.add_argument("--scale", default="paper", choices=SCALES)
    sub.add_parser("lmms-eval", help=f"run lmms-eval's CLI with --model {' / '.join(LMMS_EVAL_MODELS)} available")
    ns = parser.parse_args(args)
    try:
        df = retention_report(ns.upper_bound, ns.pruned, ns.out, scale=ns.scale)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with pd.option_context("display.float_format", "{:.2f}".format):
        print(df.to_string())
    for side, note in df.attrs["sources"].items():
        print(f"{side}: {note}")
    if df.attrs["missing"]:
        missing = ", ".join(f"{k} (no {v} score)" for k, v in df.attrs["missing_from"].items())
        print(f"missing, left out of {AVG_RATE}: {missing}")
    return 0


if __name__ == "__main__":
    from atp_repro.real.evaluation import main as _main

    raise SystemExit(_main())
