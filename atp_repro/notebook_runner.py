"""Execute every notebook with papermill, per parameter profile, and check notebook hygiene.

Notebooks are discovered (``notebooks/*.ipynb``); nothing has to be registered. A notebook may
declare parameters for a profile in ``notebooks/params/<profile>/<notebook stem>.yaml``:

========  =====================================================  ============================
profile   parameters                                              outputs (tables/, figures/)
========  =====================================================  ============================
mini      the committed defaults (the mini world)                 the repository root
smoke     ``params/smoke/<stem>.yaml``, else the defaults          ``build/notebooks/smoke``
real      ``params/real/<stem>.yaml``; notebooks without one are   ``build/notebooks/real``
          skipped (and reported)
========  =====================================================  ============================

Executed copies go to ``build/notebooks/<profile>/<stem>.ipynb`` (git-ignored). The runner
passes ``output_dir`` to every notebook, so smoke and real runs never overwrite ``tables/``.

Hygiene rules for committed notebooks (:func:`hygiene_problems`): kernel ``python3``; no
outputs or execution counts; exactly one cell tagged ``parameters``, the first code cell,
holding only ``name = <literal>`` assignments including ``output_dir``; parameter files name
only declared parameters.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from atp_repro import paths

__all__ = [
    "PROFILES",
    "Profile",
    "NotebookJob",
    "NotebookResult",
    "discover_notebooks",
    "notebook_parameters",
    "params_file",
    "plan_runs",
    "run_notebooks",
    "execute_job",
    "hygiene_problems",
    "params_problems",
    "executed_dir",
    "orphan_params_files",
    "unknown_profile_dirs",
]

OUTPUT_DIR_PARAM = "output_dir"
KERNEL_NAME = "python3"
# The kernel's own log (not the cells' output, which goes to the executed notebook): only critical
# messages. Its warnings are noise here, e.g. "Kernel is running over TCP without encryption" on every
# start (the kernel listens on localhost only), and so is the "KeyboardInterrupt caught in kernel"
# it logs as an error when it is stopped after a failed cell on a busy machine. A cell's error and a
# dead kernel still reach the runner through nbclient.
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=CRITICAL",)


@dataclass(frozen=True)
class Profile:
    """How notebooks are run for one purpose."""

    name: str
    description: str
    output_dir: str
    on_missing_params: Literal["defaults", "skip"]
    uses_params_files: bool = True


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "mini", "committed defaults: the mini world (make reproduce)", "", "defaults", False
        ),
        Profile(
            "smoke", "small parameters for CI (make test)", "build/notebooks/smoke", "defaults"
        ),
        Profile("real", "real-scale parameters for GPU machines", "build/notebooks/real", "skip"),
    )
}


@dataclass(frozen=True)
class NotebookJob:
    """One planned execution."""

    notebook: Path
    output: Path
    profile: str
    parameters: Mapping[str, Any]
    params_file: Path | None = None
    skip_reason: str | None = None

    @property
    def name(self) -> str:
        return self.notebook.stem


@dataclass(frozen=True)
class NotebookResult:
    job: NotebookJob
    status: Literal["ok", "failed", "skipped"]
    seconds: float = 0.0
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Discovery and parameters
# --------------------------------------------------------------------------------------------


def discover_notebooks(root: Path | None = None) -> list[Path]:
    """All committed notebooks, ``notebooks/*.ipynb``, sorted by name."""
    folder = (root or paths.repo_root()) / "notebooks"
    return sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))


def params_file(notebook: Path, profile: str) -> Path:
    """Where the parameter file of ``notebook`` for ``profile`` lives (it may not exist)."""
    return notebook.parent / "params" / profile / f"{notebook.stem}.yaml"


def executed_dir(profile: str) -> Path:
    """Folder that receives the executed copies of ``profile``."""
    return paths.repo_root() / "build" / "notebooks" / profile


def _load_nb(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _code_cells(nb: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]


def _tags(cell: Mapping[str, Any]) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _parse_parameters(source: str) -> tuple[dict[str, Any], list[str]]:
    """(parameters, problems) of a parameters cell: literal assignments only."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        return {}, [f"parameters cell is not valid Python ({err.msg}, line {err.lineno})"]
    params: dict[str, Any] = {}
    problems = []
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if not isinstance(target, ast.Name) or value is None:
            problems.append(
                f"parameters cell line {node.lineno}: only 'name = <literal>' assignments are "
                f"allowed, found {type(node).__name__}"
            )
            continue
        try:
            params[target.id] = ast.literal_eval(value)
        except ValueError:
            problems.append(
                f"parameters cell line {node.lineno}: '{target.id}' is not a literal "
                f"(got {ast.unparse(value)!r}); compute derived values in a later cell"
            )
    return params, problems


def notebook_parameters(notebook: Path) -> dict[str, Any]:
    """The parameters a notebook declares (name -> default) in its ``parameters`` cell."""
    cells = [c for c in _code_cells(_load_nb(notebook)) if "parameters" in _tags(c)]
    if not cells:
        raise ValueError(f"{notebook}: no code cell tagged 'parameters'")
    params, problems = _parse_parameters(_source(cells[0]))
    if problems:
        raise ValueError(f"{notebook}: " + "; ".join(problems))
    return params


def _read_params_file(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping 'parameter: value', got {type(data).__name__}"
        )
    return data


# --------------------------------------------------------------------------------------------
# Planning and execution
# --------------------------------------------------------------------------------------------


def plan_runs(
    profile: str = "mini",
    *,
    only: Sequence[str] | None = None,
    output_dir: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    executed_to: Path | None = None,
) -> list[NotebookJob]:
    """Plan one job per notebook for ``profile``.

    Parameter precedence: notebook defaults < params file < ``output_dir`` of the profile (or
    the ``output_dir`` argument) < ``overrides``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: unknown; allowed: {sorted(PROFILES)}")
    spec = PROFILES[profile]
    notebooks = discover_notebooks()
    if only:
        by_stem = {nb.stem: nb for nb in notebooks}
        for name in only:
            stem = Path(name).stem
            if stem not in by_stem:
                close = [s for s in by_stem if s.startswith(stem)]
                close = close or difflib.get_close_matches(stem, list(by_stem), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"only={name!r}: no such notebook{hint} (known: {', '.join(sorted(by_stem))})"
                )
        wanted = {Path(n).stem for n in only}
        notebooks = [nb for nb in notebooks if nb.stem in wanted]
    out_folder = executed_to or executed_dir(profile)
    declared = {nb: notebook_parameters(nb) for nb in notebooks}
    _check_overrides(overrides or {}, declared)
    jobs = []
    for nb in notebooks:
        pfile = params_file(nb, profile)
        parameters: dict[str, Any] = {}
        skip = None
        if spec.uses_params_files and pfile.is_file():
            from_file = _read_params_file(pfile)
            unknown = sorted(set(from_file) - set(declared[nb]))
            if unknown:
                raise ValueError(f"{pfile}: {_unknown_message(unknown[0], declared[nb], nb.stem)}")
            parameters.update(from_file)
        elif spec.uses_params_files and spec.on_missing_params == "skip":
            skip = f"no parameter file {pfile.relative_to(paths.repo_root())}"
        chosen_output = output_dir if output_dir is not None else spec.output_dir
        if OUTPUT_DIR_PARAM not in parameters or output_dir is not None:
            parameters[OUTPUT_DIR_PARAM] = chosen_output
        # an override goes to the notebooks that declare it (e.g. `components` to the ablation only)
        parameters.update({k: v for k, v in (overrides or {}).items() if k in declared[nb]})
        jobs.append(
            NotebookJob(
                notebook=nb,
                output=out_folder / nb.name,
                profile=profile,
                parameters=parameters,
                params_file=pfile if spec.uses_params_files and pfile.is_file() else None,
                skip_reason=skip,
            )
        )
    return jobs


def _unknown_message(name: str, known: Mapping[str, Any], where: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"parameter {name!r} is not declared by {where}{hint} (declared: {', '.join(sorted(known))})"


def _check_overrides(overrides: Mapping[str, Any], declared: Mapping[Path, Mapping[str, Any]]) -> None:
    """Every override must be a parameter of at least one planned notebook (a misspelled name would
    otherwise run every notebook with its defaults and overwrite the tables)."""
    known = {name: None for params in declared.values() for name in params}
    for name in overrides:
        if name not in known:
            where = "any of the selected notebooks" if len(declared) != 1 else next(iter(declared)).stem
            raise ValueError(f"-p {name}: {_unknown_message(name, known, where)}")


def notebook_outputs(stem: str, output_dir: str | None) -> list[Path]:
    """The files a notebook named ``stem`` has written: ``tables/<stem>.*`` and ``figures/<stem>[_.]*``."""
    root = paths.output_root(output_dir)
    found = list((root / "tables").glob(f"{stem}.*")) + list((root / "figures").glob(f"{stem}.*"))
    found += list((root / "figures").glob(f"{stem}_*"))
    return sorted(p for p in found if p.is_file())


def _restore_outputs(stem: str, output_dir: str | None, backup: Path, saved: list[Path]) -> None:
    """Put a notebook's outputs back as they were before a failed run (new files go, old ones return)."""
    for path in notebook_outputs(stem, output_dir):
        path.unlink()
    root = paths.output_root(output_dir)
    for path in saved:
        target = root / path.relative_to(backup)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def execute_job(
    job: NotebookJob, *, cell_timeout: int | None = None, log_output: bool = False
) -> NotebookResult:
    """Execute one job with papermill (kernel ``python3``, working directory = repo root).

    All or nothing: the notebook's previous tables, figures and provenance are set aside first and
    put back if it fails, so a failed run never leaves new and stale outputs side by side.
    """
    if job.skip_reason:
        return NotebookResult(job, "skipped", error=job.skip_reason)
    root = paths.repo_root()
    job.output.parent.mkdir(parents=True, exist_ok=True)
    os.environ[paths.ROOT_ENV_VAR] = str(root)  # inherited by the kernel
    output_dir = job.parameters.get(OUTPUT_DIR_PARAM)
    with tempfile.TemporaryDirectory(prefix=f"{job.name}-outputs-") as tmp:
        backup = Path(tmp)
        out_root = paths.output_root(output_dir)
        saved = []
        for path in notebook_outputs(job.name, output_dir):
            copy = backup / path.relative_to(out_root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
            saved.append(copy)
        try:
            result = _execute(job, root, cell_timeout, log_output)
        except BaseException:  # e.g. Ctrl-C while the kernel runs
            _restore_outputs(job.name, output_dir, backup, saved)
            raise
        if result.status != "ok":
            _restore_outputs(job.name, output_dir, backup, saved)
        return result


def _execute(job: NotebookJob, root: Path, cell_timeout: int | None, log_output: bool) -> NotebookResult:
    import papermill

    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(job.notebook),
            str(job.output),
            parameters=dict(job.parameters),
            kernel_name=KERNEL_NAME,
            cwd=str(root),
            progress_bar=False,
            log_output=log_output,
            execution_timeout=cell_timeout,
            extra_arguments=list(KERNEL_ARGUMENTS),
        )
    except Exception as err:  # papermill raises PapermillExecutionError, NoSuchKernel, ...
        summary = str(err).strip().splitlines()
        message = f"{type(err).__name__}: " + " | ".join(summary[-6:])
        return NotebookResult(job, "failed", time.perf_counter() - start, message)
    return NotebookResult(job, "ok", time.perf_counter() - start)


def run_notebooks(
    jobs: Iterable[NotebookJob],
    *,
    jobs_in_parallel: int = 1,
    cell_timeout: int | None = None,
    log_output: bool = False,
    clean: bool = False,
    echo: Any = print,
) -> list[NotebookResult]:
    """Execute ``jobs`` (in parallel processes if ``jobs_in_parallel > 1``); never raises for a
    failing notebook — check the statuses. With ``clean``, stale executed copies in the
    target folders are removed first."""
    jobs = list(jobs)
    if clean:
        for folder in {j.output.parent for j in jobs}:
            for stale in folder.glob("*.ipynb"):
                stale.unlink()
    for job in jobs:
        if job.skip_reason:
            echo(f"[skip] {job.name}: {job.skip_reason}")
    kwargs = {"cell_timeout": cell_timeout, "log_output": log_output}
    runnable = [i for i, job in enumerate(jobs) if not job.skip_reason]
    label = {i: f"[{n}/{len(runnable)}]" for n, i in enumerate(runnable, 1)}
    start = time.perf_counter()
    results: dict[int, NotebookResult] = {}
    if jobs_in_parallel > 1:
        echo(f"running {len(runnable)} notebooks, {jobs_in_parallel} at a time")
        with ProcessPoolExecutor(max_workers=jobs_in_parallel) as pool:
            futures = {pool.submit(execute_job, job, **kwargs): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = _report(fut.result(), echo, label.get(i, ""), time.perf_counter() - start)
    else:
        for i, job in enumerate(jobs):
            if not job.skip_reason:
                echo(f"{label[i]} {job.name}: starting ({job.profile} -> {_rel(job.output)})")
            results[i] = _report(execute_job(job, **kwargs), echo, label.get(i, ""), time.perf_counter() - start)
    ordered = [results[i] for i in range(len(jobs))]
    _write_summary(ordered)
    return ordered


def _rel(path: Path) -> str:
    root = paths.repo_root()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def format_seconds(seconds: float) -> str:
    """``12.3 s`` under a minute, else ``4 min 05 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s"


def _report(result: NotebookResult, echo: Any, label: str, elapsed: float) -> NotebookResult:
    took, total = format_seconds(result.seconds), format_seconds(elapsed)
    if result.status == "ok":
        echo(f"{label} {result.job.name}: ok in {took} (elapsed {total})")
    elif result.status == "failed":
        echo(f"{label} {result.job.name}: FAILED after {took} (elapsed {total})\n       {result.error}")
        echo(f"       executed copy with the traceback: {_rel(result.job.output)}")
    return result


def _write_summary(results: Sequence[NotebookResult]) -> None:
    by_folder: dict[Path, list[dict[str, Any]]] = {}
    for r in results:
        by_folder.setdefault(r.job.output.parent, []).append(
            {
                "notebook": r.job.name,
                "profile": r.job.profile,
                "status": r.status,
                "seconds": round(r.seconds, 2),
                "parameters": dict(r.job.parameters),
                "params_file": _rel(r.job.params_file) if r.job.params_file else None,
                "error": r.error,
            }
        )
    for folder, rows in by_folder.items():
        # A later run of some notebooks (--only) updates their entries and keeps the others'.
        previous = []
        with contextlib.suppress(OSError, ValueError):  # none yet, or unreadable: start afresh
            previous = json.loads((folder / "run-summary.json").read_text())
        ran = {row["notebook"] for row in rows}
        kept = [row for row in previous if isinstance(row, dict) and row.get("notebook") not in ran]
        merged = sorted(kept + rows, key=lambda row: str(row.get("notebook")))
        paths.atomic_write_text(folder / "run-summary.json", json.dumps(merged, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Hygiene
# --------------------------------------------------------------------------------------------


def hygiene_problems(notebook: Path) -> list[str]:
    """Everything wrong with a committed notebook (empty list = clean)."""
    try:
        nb = _load_nb(notebook)
    except (OSError, json.JSONDecodeError) as err:
        return [f"cannot be read as JSON ({err})"]
    problems = []
    kernel = nb.get("metadata", {}).get("kernelspec", {})
    if kernel.get("name") != KERNEL_NAME:
        problems.append(f"kernelspec name is {kernel.get('name')!r}; must be {KERNEL_NAME!r}")
    if kernel.get("language", "python") != "python":
        problems.append(f"kernelspec language is {kernel.get('language')!r}; must be 'python'")
    code = _code_cells(nb)
    for i, cell in enumerate(code):
        if cell.get("outputs"):
            problems.append(f"code cell {i} has outputs (strip them: nbstripout)")
        if cell.get("execution_count") is not None:
            problems.append(f"code cell {i} has an execution count (strip it: nbstripout)")
    tagged = [i for i, c in enumerate(code) if "parameters" in _tags(c)]
    if not code:
        problems.append("has no code cells (a 'parameters' cell is required)")
    elif tagged != [0]:
        if not tagged:
            problems.append("has no cell tagged 'parameters' (it must be the first code cell)")
        elif len(tagged) > 1:
            problems.append(f"has {len(tagged)} cells tagged 'parameters'; exactly one is allowed")
        else:
            problems.append(f"the 'parameters' cell is code cell {tagged[0]}; it must be the first")
    if code and tagged:
        params, parse_problems = _parse_parameters(_source(code[tagged[0]]))
        problems += parse_problems
        if not parse_problems and OUTPUT_DIR_PARAM not in params:
            problems.append(
                f"parameters cell does not declare {OUTPUT_DIR_PARAM!r} (the runner passes it "
                "so that CI runs do not overwrite tables/)"
            )
        if not parse_problems:
            problems += _papermill_problems(notebook, params)
        problems += params_problems(notebook, params)
    return problems


def _papermill_problems(notebook: Path, declared: Mapping[str, Any]) -> list[str]:
    """Parameters that papermill itself cannot parse (it then ignores them silently)."""
    import logging

    import papermill

    logger = logging.getLogger("papermill")
    level = logger.level
    logger.setLevel(logging.ERROR)  # papermill warns about unparsable lines; we report them
    try:
        seen = set(papermill.inspect_notebook(str(notebook)))
    finally:
        logger.setLevel(level)
    return [
        f"papermill cannot parse the parameter {name!r} (keep comments free of quotes and "
        "write one 'name = literal  # comment' per line)"
        for name in declared
        if name not in seen
    ]


def params_problems(notebook: Path, declared: Mapping[str, Any] | None = None) -> list[str]:
    """Parameter files of ``notebook`` that name undeclared parameters."""
    declared = notebook_parameters(notebook) if declared is None else declared
    problems = []
    for profile, spec in PROFILES.items():
        pfile = params_file(notebook, profile)
        if not spec.uses_params_files:
            continue
        if not pfile.is_file():
            continue
        try:
            data = _read_params_file(pfile)
        except (ValueError, yaml.YAMLError) as err:
            problems.append(f"{pfile.name} ({profile}): {err}")
            continue
        for key in data:
            if key not in declared:
                close = difflib.get_close_matches(str(key), list(declared), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(
                    f"params/{profile}/{pfile.name}: parameter {key!r} is not declared in the "
                    f"notebook's parameters cell{hint}"
                )
    return problems


def orphan_params_files(root: Path | None = None) -> list[Path]:
    """Parameter files whose notebook does not exist."""
    root = root or paths.repo_root()
    stems = {nb.stem for nb in discover_notebooks(root)}
    folder = root / "notebooks" / "params"
    return sorted(p for p in folder.glob("*/*.yaml") if p.stem not in stems)


def unknown_profile_dirs(root: Path | None = None) -> list[Path]:
    """Folders under ``notebooks/params`` that are not a profile taking parameter files."""
    folder = (root or paths.repo_root()) / "notebooks" / "params"
    if not folder.is_dir():
        return []
    takes_files = {name for name, p in PROFILES.items() if p.uses_params_files}
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in takes_files)
