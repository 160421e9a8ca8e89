"""The paper's reported numbers, and "paper vs this run" comparison tables.

``paper/paper_numbers.csv`` holds every number of supplementary Tables 1-8 and the main paper's
Table 1 and Table 6 facts, one number per row::

    artifact, row, column, value, value_text, unit, source, notes

``value`` is the number (empty for a non-numeric cell such as ``Cosine decay`` or a ``-``);
``value_text`` is the cell exactly as printed (``2e-5``, ``98.1%``, ``1122*``, ``ZeRO-3``).

Every notebook builds its result table with :func:`compare_with_paper` (columns ``paper``,
``this_run``, ``delta``, ``match``), evaluates its claims as :class:`Claim` objects and writes
both with :func:`write_comparison` (``tables/<name>.csv``, ``.md`` and ``.claims.csv``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from atp_repro import paths

__all__ = [
    "PAPER_NUMBERS",
    "PAPER_COLUMNS",
    "ARTIFACTS",
    "COMPARISON_COLUMNS",
    "PaperNumbersError",
    "Claim",
    "load_paper_numbers",
    "paper_value",
    "compare_with_paper",
    "claims_frame",
    "show_claims",
    "write_comparison",
    "to_markdown",
    "format_number",
]

PAPER_NUMBERS = "paper/paper_numbers.csv"
PAPER_COLUMNS = ("artifact", "row", "column", "value", "value_text", "unit", "source", "notes")
ARTIFACTS = (
    *(f"supp_table{i}" for i in range(1, 9)),
    "main_table1",
    "main_table6",
)
COMPARISON_COLUMNS = ("row", "column", "unit", "scale", "paper", "this_run", "delta", "match")


class PaperNumbersError(ValueError):
    """The paper-numbers file is malformed, or a requested entry does not exist."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_paper_numbers(
    artifact: str | None = None, path: str | os.PathLike[str] | None = None
) -> pd.DataFrame:
    """Load (and validate) the paper's numbers, optionally only those of one ``artifact``.

    Raises:
        PaperNumbersError: on missing columns, unknown artifacts, duplicate cells or a
            ``value`` that does not parse as a number.
    """
    file = paths.resolve(path or PAPER_NUMBERS)
    df = pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = [c for c in PAPER_COLUMNS if c not in df.columns]
    if missing:
        raise PaperNumbersError(
            f"{file}: missing columns {missing}; expected {list(PAPER_COLUMNS)}"
        )
    unknown = sorted(set(df.artifact) - set(ARTIFACTS))
    if unknown:
        raise PaperNumbersError(
            f"{file}: unknown artifact(s) {unknown}; allowed: {list(ARTIFACTS)}"
        )
    dup = df.duplicated(["artifact", "row", "column"], keep=False)
    if dup.any():
        cells = df.loc[dup, ["artifact", "row", "column"]].drop_duplicates().values.tolist()
        raise PaperNumbersError(f"{file}: duplicate cells {cells}")
    try:
        df["value"] = [float(v) if v != "" else math.nan for v in df["value"]]
    except ValueError as err:
        raise PaperNumbersError(f"{file}: non-numeric entry in column 'value' ({err})") from None
    if artifact is not None:
        if artifact not in ARTIFACTS:
            raise PaperNumbersError(f"unknown artifact {artifact!r}; allowed: {list(ARTIFACTS)}")
        df = df[df.artifact == artifact].reset_index(drop=True)
    return df


def paper_value(
    artifact: str, row: str, column: str, *, paper: pd.DataFrame | None = None
) -> float:
    """The number the paper reports in one cell (NaN for a ``-`` or a text cell)."""
    df = load_paper_numbers() if paper is None else paper
    hit = df[(df.artifact == artifact) & (df.row == row) & (df.column == column)]
    if hit.empty:
        options = sorted(set(df[df.artifact == artifact].row))
        raise PaperNumbersError(
            f"no paper number for artifact={artifact!r}, row={row!r}, column={column!r}; "
            f"rows of {artifact}: {options}"
        )
    return float(hit.value.iloc[0])


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def compare_with_paper(
    artifact: str,
    this_run: pd.DataFrame,
    *,
    scale: str,
    rel_tol: float = 1e-9,
    abs_tol: float = 1e-12,
    paper: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Put this run's numbers beside the paper's, cell by cell.

    Args:
        artifact: e.g. ``"supp_table6"`` (see :data:`ARTIFACTS`).
        this_run: tidy frame with columns ``row``, ``column``, ``value`` and optionally
            ``value_text`` (used where ``value`` is missing, e.g. for text cells).
        scale: the scale the run was made at (``"mini"``, ``"real"``), shown in every row.
        rel_tol, abs_tol: tolerance of the ``match`` flag for numeric cells (``math.isclose``).
        paper: the paper numbers (default: :func:`load_paper_numbers`).

    Returns:
        One row per cell of the paper's table (in the paper's order), then any cells only this
        run has, with columns ``row, column, unit, scale, paper, this_run, delta, match``.
        ``paper`` and ``this_run`` are numbers where the cell is numeric, else the printed text;
        ``delta`` is ``this_run - paper`` for numeric pairs; ``match`` is ``None`` where a side
        is missing.
    """
    for col in ("row", "column", "value"):
        if col not in this_run.columns:
            raise ValueError(f"this_run: missing column {col!r}; expected row, column, value")
    ref = load_paper_numbers(artifact) if paper is None else paper[paper.artifact == artifact]
    run = this_run.copy()
    if "value_text" not in run.columns:
        run["value_text"] = None
    if run.duplicated(["row", "column"]).any():
        dups = run.loc[run.duplicated(["row", "column"]), ["row", "column"]].values.tolist()
        raise ValueError(f"this_run: duplicate cells {dups}")
    run_cells = {(r.row, r.column): r for r in run.itertuples(index=False)}
    records = []
    for p in ref.itertuples(index=False):
        records.append(
            _compare_cell(
                p.row,
                p.column,
                p.unit,
                scale,
                p,
                run_cells.pop((p.row, p.column), None),
                rel_tol,
                abs_tol,
            )
        )
    for (row, column), r in run_cells.items():
        records.append(_compare_cell(row, column, "", scale, None, r, rel_tol, abs_tol))
    return pd.DataFrame.from_records(records, columns=list(COMPARISON_COLUMNS))


def _compare_cell(
    row: str, column: str, unit: str, scale: str, p: Any, r: Any, rel_tol: float, abs_tol: float
) -> dict[str, Any]:
    p_num = p.value if p is not None and _is_number(p.value) else None
    r_val = None if r is None else r.value
    if isinstance(r_val, float) and math.isnan(r_val):  # not computable (e.g. a spread over one seed): missing
        r_val = None
    r_num = float(r_val) if r_val is not None and _is_number(r_val) else None
    paper_cell = p_num if p_num is not None else (p.value_text if p is not None else None)
    if r is None:
        run_cell = None
    elif r_num is not None:
        run_cell = r_num
    else:
        run_cell = (
            r.value_text
            if isinstance(r.value_text, str)
            else (None if r_val is None else str(r_val))
        )
    delta = r_num - p_num if p_num is not None and r_num is not None else None
    if paper_cell is None or run_cell is None or paper_cell == "-":
        match = None
    elif p_num is not None and r_num is not None:
        match = math.isclose(r_num, p_num, rel_tol=rel_tol, abs_tol=abs_tol)
    else:
        match = str(paper_cell) == str(run_cell)
    return {
        "row": row,
        "column": column,
        "unit": unit,
        "scale": scale,
        "paper": paper_cell,
        "this_run": run_cell,
        "delta": delta,
        "match": match,
    }


@dataclass(frozen=True)
class Claim:
    """A statement from the paper checked against this run.

    Args:
        claim: the statement, in words (e.g. "ATP keeps >= 98% of the upper bound at 144 tokens").
        holds: whether it holds in this run (``None`` = could not be checked).
        evidence: the numbers behind the verdict.
    """

    claim: str
    holds: bool | None
    evidence: str = ""
    inconclusive: bool = False  # the interval behind the claim straddles its threshold (holds is None)

    def __post_init__(self) -> None:
        if not isinstance(self.claim, str) or not self.claim.strip():
            raise ValueError("Claim.claim must be a non-empty string")
        if self.holds is not None and not isinstance(self.holds, bool):
            raise ValueError(f"Claim.holds must be True, False or None, got {self.holds!r}")
        if self.inconclusive and self.holds is not None:
            raise ValueError("an inconclusive Claim has holds=None")

    @property
    def verdict(self) -> str:
        if self.inconclusive:
            return "inconclusive"
        return {True: "holds", False: "does not hold", None: "not checked"}[self.holds]

    @classmethod
    def from_interval(cls, claim: str, low: float, high: float, threshold: float = 0.0, evidence: str = "") -> Claim:
        """A claim "the quantity exceeds ``threshold``" judged from an interval of that quantity.

        Holds when the whole interval lies above the threshold, does not hold when it lies at or below
        it, and is inconclusive when the interval straddles it (or is undefined).
        """
        if math.isnan(low) or math.isnan(high):
            return cls(claim, None, evidence, inconclusive=True)
        if low > threshold:
            return cls(claim, True, evidence)
        if high <= threshold:
            return cls(claim, False, evidence)
        return cls(claim, None, evidence, inconclusive=True)

    @classmethod
    def within(cls, claim: str, low: float, high: float, bound: float, evidence: str = "") -> Claim:
        """A claim "the quantity lies within +-``bound``" judged from an interval of that quantity.

        Holds when the whole interval lies inside (-bound, bound), does not hold when it lies wholly
        outside, and is inconclusive otherwise.
        """
        if math.isnan(low) or math.isnan(high):
            return cls(claim, None, evidence, inconclusive=True)
        if -bound < low and high < bound:
            return cls(claim, True, evidence)
        if low >= bound or high <= -bound:
            return cls(claim, False, evidence)
        return cls(claim, None, evidence, inconclusive=True)

    @classmethod
    def all_of(cls, claim: str, parts: Iterable[Claim], evidence: str = "") -> Claim:
        """A conjunction: does not hold if a part does not, holds if every part does, else inconclusive
        (or not checked when a part was not)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Claim.all_of needs at least one part")
        if any(p.holds is False for p in parts):
            return cls(claim, False, evidence)
        if all(p.holds is True for p in parts):
            return cls(claim, True, evidence)
        if any(p.inconclusive for p in parts):
            return cls(claim, None, evidence, inconclusive=True)
        return cls(claim, None, evidence)


def claims_frame(claims: Iterable[Claim]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"claim": c.claim, "holds": c.holds, "verdict": c.verdict, "evidence": c.evidence}
            for c in claims
        ],
        columns=["claim", "holds", "verdict", "evidence"],
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def format_number(x: Any) -> str:
    """Short, stable text for a table cell: ``2e-5``, ``1510.7``, ``128``, ``-`` for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if float(x).is_integer() and abs(x) < 1e15:
            return str(int(x))
        if abs(x) < 1e-3 or abs(x) >= 1e15:
            mantissa, exponent = f"{x:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{x:.6g}"
    return str(x)


def to_markdown(df: pd.DataFrame) -> str:
    """GitHub-flavoured markdown table (no extra dependency; ``|`` in cells is escaped)."""

    def cell(x: Any) -> str:
        return format_number(x).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def write_comparison(
    table: pd.DataFrame,
    name: str,
    *,
    title: str,
    claims: Sequence[Claim] = (),
    notes: Sequence[str] = (),
    output_dir: str | os.PathLike[str] | None = None,
    artifacts: Sequence[str] = (),
    comparable: Collection[str] = (),
    view: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write ``tables/<name>.csv``, ``tables/<name>.md`` and (with claims)
    ``tables/<name>.claims.csv``, each atomically.

    The CSV is ``table`` as it is (the tidy data file). The markdown is for reading: a long
    comparison (:func:`compare_with_paper`) is drawn in the paper's wide shape, rounded as the
    paper of ``artifacts`` prints each column, with ``match`` shown only for rates and the
    ``comparable`` columns (:mod:`atp_repro.paper_render`); any other table (or ``view``, a
    readable selection of it) with shortened numbers.

    The files hold no timestamps or run ids, so identical results give identical bytes; run
    metadata goes to the provenance sidecar (:mod:`atp_repro.provenance`).
    """
    from atp_repro import paper_render

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name={name!r}: use letters, digits, '_', '-', '.' only")
    out = paths.tables_dir(output_dir)
    written = {"csv": paths.atomic_write_text(out / f"{name}.csv", _to_csv(table))}
    md = [f"# {title}", ""]
    md += [f"> {n}" for n in notes] + ([""] if notes else [])
    if view is None and set(paper_render.LONG_COLUMNS) <= set(table.columns):
        blocks = paper_render.render_comparison(table, artifacts=artifacts, comparable=comparable)
    else:
        blocks = paper_render.render_frame(table if view is None else view)
    md += [b if b.endswith("\n") else b + "\n" for b in blocks]
    if claims:
        cf = claims_frame(claims)
        written["claims"] = paths.atomic_write_text(out / f"{name}.claims.csv", _to_csv(cf))
        md += ["## Claims", "", to_markdown(cf.drop(columns=["holds"]))]
    written["md"] = paths.atomic_write_text(out / f"{name}.md", "\n".join(md))
    return written


def _csv_cell(x: Any) -> Any:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return format(x, ".12g")
    return x


def _to_csv(df: pd.DataFrame) -> str:
    return df.astype(object).map(_csv_cell).to_csv(index=False, lineterminator="\n")


def show_claims(claims: Iterable[Claim]) -> Any:
    """The claims as a markdown table for a notebook, every text in full (pandas would cut them)."""
    from IPython.display import Markdown

    return Markdown(to_markdown(claims_frame(claims).drop(columns=["holds"])))
