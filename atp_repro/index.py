"""``index.ipynb`` at the repository root: the page ``make lab`` opens.

It is generated (``atp-repro index``; ``make lab`` regenerates it first) from what is in the
checkout, so it does not drift: every notebook of ``notebooks/`` with its title, its table
(``tables/<name>.md``), its figures (``figures/<name>*``), and its run time on a cold and on a warm
cache of trained artifacts, read from ``docs/notebook_run_times.csv``; and the claims summary.
The notebook holds markdown cells only, so JupyterLab renders it on opening, and it lies outside
``notebooks/``, so the runner, papermill and nbval never execute it.

The run times are measurements, recorded with :func:`run_times_from_provenance` from the
provenance sidecars of a ``make reproduce`` run (the runner executes the notebooks one after
the other in name order).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nbformat

from . import claims_summary, notebook_runner, paths

__all__ = [
    "INDEX_NAME",
    "RUN_TIMES",
    "NotebookEntry",
    "entries",
    "read_run_times",
    "run_times_from_provenance",
    "record_run_times",
    "render",
    "write_index",
]

INDEX_NAME = "index.ipynb"
RUN_TIMES = Path("docs") / "notebook_run_times.csv"
RUN_TIME_COLUMNS = ("notebook", "cold_s", "warm_s")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


@dataclass(frozen=True)
class NotebookEntry:
    name: str  # notebook stem
    title: str
    tables: tuple[str, ...]  # paths from the repository root
    figures: tuple[str, ...]
    cold_s: float | None
    warm_s: float | None


def _title(notebook: Path) -> str:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = cell.get("source", "")
        for line in ("".join(source) if isinstance(source, list) else source).splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return notebook.stem


def read_run_times(path: Path) -> dict[str, tuple[float | None, float | None]]:
    """notebook -> (cold seconds, warm seconds) from the run-times CSV (empty cell: not measured)."""
    if not path.is_file():
        return {}
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    if tuple(reader.fieldnames or ()) != RUN_TIME_COLUMNS:
        raise ValueError(f"{path}: columns must be {list(RUN_TIME_COLUMNS)}, found {reader.fieldnames}")
    out = {}
    for row in reader:
        try:
            out[row["notebook"]] = tuple(float(row[c]) if row[c] else None for c in RUN_TIME_COLUMNS[1:])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}, line {reader.line_num}: seconds must be numbers or empty ({err})") from err
    return out


def run_times_from_provenance(tables: Path) -> dict[str, float]:
    """Seconds per notebook of the sequential run whose provenance sidecars are in ``tables``.

    A sidecar's own ``wall_time_s`` may time only the block that writes the table, so a notebook's
    time is taken from the previous notebook's end to its own end (kernel start, training, the
    table); the first notebook, which has no predecessor, gets its ``wall_time_s``.
    """
    runs = []
    for sidecar in tables.glob("*.provenance.json"):
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        runs.append((datetime.fromisoformat(record["started_at"]), datetime.fromisoformat(record["finished_at"]),
                     record["name"], float(record["wall_time_s"])))
    runs.sort()
    out = {}
    for i, (_, finished, name, wall) in enumerate(runs):
        out[name] = wall if i == 0 else (finished - runs[i - 1][1]).total_seconds()
    return out


def record_run_times(cache: str, root: Path | None = None) -> Path:
    """Store the run times of the last ``make reproduce`` (from ``tables/*.provenance.json``) as the
    ``cache`` ("cold" or "warm") column of the run-times CSV; other rows and columns are kept."""
    if cache not in ("cold", "warm"):
        raise ValueError(f"cache={cache!r}: allowed values are 'cold' and 'warm'")
    root = root or paths.repo_root()
    times = {name: list(pair) for name, pair in read_run_times(root / RUN_TIMES).items()}
    for name, seconds in run_times_from_provenance(root / "tables").items():
        times.setdefault(name, [None, None])[0 if cache == "cold" else 1] = seconds
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RUN_TIME_COLUMNS)
    for name in sorted(times):
        writer.writerow([name, *("" if s is None else f"{s:.1f}" for s in times[name])])
    return paths.atomic_write_text(root / RUN_TIMES, buf.getvalue())


def entries(root: Path | None = None) -> list[NotebookEntry]:
    root = root or paths.repo_root()
    times = read_run_times(root / RUN_TIMES)
    out = []
    for notebook in notebook_runner.discover_notebooks(root):
        name = notebook.stem
        tables = (f"tables/{name}.md",) if (root / "tables" / f"{name}.md").is_file() else ()
        figures = tuple(
            p.relative_to(root).as_posix()
            for p in sorted((root / "figures").glob(f"{name}*"))
            if p.suffix in FIGURE_SUFFIXES
        )
        cold, warm = times.get(name, (None, None))
        out.append(NotebookEntry(name, _title(notebook), tables, figures, cold, warm))
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s"


def _links(items: tuple[str, ...]) -> str:
    return ", ".join(f"[{Path(p).name}]({p})" for p in items) or "—"


def _cells(items: list[NotebookEntry]) -> list[str]:
    intro = (
        "# ATP-LLaVA in the mini world: notebooks, tables and figures\n\n"
        "Generated by `atp-repro index` (run by `make lab`); edit `atp_repro/index.py`, not this page.\n\n"
        "Each notebook reproduces one artifact of the paper in the mini world and writes its table to `tables/` "
        "and its figures to `figures/`. Open a notebook below and run it (*Run ▸ Run All Cells*), or rebuild "
        "everything with `make reproduce`. Notebooks train the models they need on first use and keep them in "
        "the cache of trained artifacts (`.cache/atp-repro`, or `$ATP_REPRO_CACHE`); later runs load them."
    )
    rows = ["| notebook | table | figures | cold cache | warm cache |", "|---|---|---|---|---|"]
    for e in items:
        rows.append(
            f"| [{e.title}](notebooks/{e.name}.ipynb) | {_links(e.tables)} | {_links(e.figures)} "
            f"| {_duration(e.cold_s)} | {_duration(e.warm_s)} |"
        )
    table = "## Notebooks\n\n" + "\n".join(rows)
    measured = [e for e in items if e.cold_s is not None]
    total_cold = sum(e.cold_s for e in measured)
    total_warm = sum(e.warm_s for e in measured if e.warm_s is not None)
    first = measured[0].name if measured else None
    times = (
        "## Run times\n\n"
        f"Measured with `make reproduce` (pinned AVX2 numerics, 2 CPU threads) from the provenance sidecars "
        f"`tables/*.provenance.json` and recorded in `{RUN_TIMES.as_posix()}`: {_duration(total_cold)} in all on a "
        f"**cold** cache (nothing trained yet), {_duration(total_warm)} on a **warm** one (every model already "
        "trained: the notebooks load, evaluate and render). Each column is one run on a 2-core machine that "
        "other jobs shared at times; the timing notebooks (supplementary Tables 3 and 4) time the models "
        "themselves and slow down most when the CPU is busy.\n\n"
        "The cold times depend on the order: the notebooks share trained models, and whichever runs first "
        "trains them. `make reproduce` runs the notebooks in name order, so the first one"
        + (f", `{first}`," if first else "")
        + " also trains the shared vision tower and the upper-bound model that the others then load from the "
        "cache. Run on its own on a cold cache, any other notebook takes that much longer."
    )
    claims = (
        "## Claims\n\n"
        f"[tables/{claims_summary.SUMMARY_MD}](tables/{claims_summary.SUMMARY_MD}): every claim the notebooks "
        "check, with its verdict (holds, does not hold, inconclusive) and the evidence, one row each, linked to "
        "the table it belongs to."
    )
    return [intro, table, times, claims]


def render(root: Path | None = None) -> str:
    """The index notebook's text (nbformat 4, markdown cells only, fixed cell ids)."""
    root = root or paths.repo_root()
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": notebook_runner.KERNEL_NAME},
        "language_info": {"name": "python"},
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell(source, id=f"index-{i:02d}")
        for i, source in enumerate(_cells(entries(root)))
    ]
    # nbformat's own layout (what nbstripout writes too, so the git filter leaves the file as is)
    return nbformat.writes(nb) + "\n"


def write_index(root: Path | None = None) -> Path:
    root = root or paths.repo_root()
    return paths.atomic_write_text(root / INDEX_NAME, render(root))
