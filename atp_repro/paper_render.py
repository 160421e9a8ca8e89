"""Paper-shaped markdown for the "paper vs this run" tables.

:func:`atp_repro.paper.compare_with_paper` gives a tidy long frame (one row per cell), which stays the
data file (``tables/<name>.csv``). People read the paper's tables wide: one row per method or
setting, one column per benchmark or quantity. :func:`render_comparison` turns the long frame back
into that shape:

- each cell holds the paper's value and this run's, ``paper / this run``;
- this run's number is rounded to the decimals the paper prints in that cell (``98.1%`` -> 1,
  ``4,376 s`` -> 0), read from the paper-numbers file; cells the paper does not have fall back to
  the decimals of the paper's column, then to :func:`default_text`;
- ``✓`` / ``✗`` (equal within the comparison's tolerance or not) only for quantities that mean the
  same at any scale: rates in percent (retention, relative change) and the columns the caller names;
  a count or a time measured at another scale is never marked;
- the scale of the run is one caption line, not a column;
- cells only this run has (intervals, seed spreads, diagnostics) go to secondary wide tables, one
  per set of rows sharing their columns; a ``X, 95% interval low`` / ``high`` pair is folded into
  one ``X, 95% interval`` cell ``low–high``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from typing import Any

import pandas as pd

from atp_repro.paper import format_number, load_paper_numbers, to_markdown

__all__ = [
    "LONG_COLUMNS",
    "MISSING",
    "printed_decimals",
    "paper_decimals",
    "default_text",
    "fixed_text",
    "is_comparable",
    "wide_tables",
    "render_comparison",
    "render_frame",
]

LONG_COLUMNS = ("row", "column", "scale", "paper", "this_run", "match")
MISSING = "–"
CELL_LEGEND = (
    "Each cell: paper / this run, this run rounded as the paper prints the column; – = not available. "
    "✓ / ✗ (equal within tolerance or not) only where the quantity is comparable across scales (rates, "
    "relative changes, real settings); counts and times measured at another scale are not marked."
)
_INTERVAL = re.compile(r"^(?P<name>.*), 95% interval (?P<end>low|high)(?: \(.*\))?$")
_PRINTED = re.compile(r"-?[\d,]*\d(?:\.(?P<frac>\d+))?(?P<exp>e-?\d+)?")


def printed_decimals(text: str) -> int | None:
    """Decimals of a number as printed (``98.1%`` -> 1, ``4,376 s`` -> 0); None for ``2e-5`` or text."""
    m = _PRINTED.search(str(text))
    if m is None or m.group("exp"):
        return None
    return len(m.group("frac") or "")


def paper_decimals(
    artifacts: Sequence[str], paper: pd.DataFrame | None = None
) -> tuple[dict[tuple[str, str], int | None], dict[str, int | None]]:
    """Per cell ``(row, column)`` and per column: the decimals the paper prints (columns: the most)."""
    df = load_paper_numbers() if paper is None else paper
    df = df[df.artifact.isin(list(artifacts))]
    cells: dict[tuple[str, str], int | None] = {}
    columns: dict[str, int | None] = {}
    for r in df.itertuples(index=False):
        if isinstance(r.value, float) and math.isnan(r.value):
            continue  # a text cell or a "-"
        d = printed_decimals(r.value_text)
        cells[(r.row, r.column)] = d
        if d is not None:
            columns[r.column] = max(d, columns.get(r.column) or 0)
    return cells, columns


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or x == ""


def default_text(x: Any) -> str:
    """A number without a paper column to follow: integers as such, >= 1 with one decimal, else two
    significant digits (``0.22``, ``2e-5``); text unchanged."""
    if _missing(x):
        return MISSING
    if not _is_number(x):
        return format_number(x)
    if float(x).is_integer():
        return str(int(x))
    if abs(x) >= 1:
        return f"{x:.1f}"
    return format_number(float(f"{x:.2g}"))


def fixed_text(x: Any, decimals: int | None) -> str:
    """``x`` with exactly ``decimals`` decimals (None: :func:`default_text`); text unchanged."""
    if _missing(x):
        return MISSING
    if not _is_number(x) or decimals is None:
        return default_text(x)
    text = f"{x:.{decimals}f}"
    return "0" if re.fullmatch(r"-0\.?0*", text) and decimals == 0 else text


def is_comparable(column: str, unit: str, comparable: Collection[str] = ()) -> bool:
    """Whether ``match`` means something for this quantity: a rate in percent, or a named column."""
    return unit == "%" or column in comparable


def _order(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _scale_caption(table: pd.DataFrame) -> str:
    if "scale" not in table.columns:
        return ""
    scales = table["scale"].fillna("").astype(str)
    main = scales.value_counts().index[0]
    others: dict[str, list[str]] = {}
    for col, s in zip(table["column"], scales):
        if s and s != main and col not in others.get(s, []):
            others.setdefault(s, []).append(col)
    parts = [f"Scale of this run: {main}"] if main else []
    parts += [f"{', '.join(cols)}: {s}" for s, cols in others.items()]
    return "; ".join(parts)


def _same_decimals(*texts: str) -> list[str]:
    """Numbers printed with the decimals of the most precise one (``58.9``, ``62`` -> ``62.0``)."""
    try:
        values = [float(t) for t in texts]
    except ValueError:
        return list(texts)
    decimals = max(printed_decimals(t) or 0 for t in texts)
    return [f"{v:.{decimals}f}" for v in values]


def _fold_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """``X, 95% interval low`` and ``X, 95% interval high`` -> one ``X, 95% interval`` column ``low–high``."""
    ends: dict[str, dict[str, str]] = {}
    for col in frame.columns:
        m = _INTERVAL.match(col)
        if m:
            ends.setdefault(m.group("name"), {})[m.group("end")] = col
    out = frame.copy()
    for name, pair in ends.items():
        if set(pair) != {"low", "high"}:
            continue
        low, high = out[pair["low"]], out[pair["high"]]
        folded = [MISSING if MISSING in (a, b) else "–".join(_same_decimals(a, b)) for a, b in zip(low, high)]
        at = list(out.columns).index(pair["low"])
        out = out.drop(columns=[pair["low"], pair["high"]])
        out.insert(at, f"{name}, 95% interval", folded)
    return out


def wide_tables(
    table: pd.DataFrame,
    *,
    artifacts: Sequence[str] = (),
    comparable: Collection[str] = (),
    paper: pd.DataFrame | None = None,
) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """The long comparison as wide frames of cell texts: (paper tables, this-run-only tables).

    Rows that share their set of columns form one table (Table 3 and main Table 6 in one file give
    two). In a block, the columns with a paper value make the paper table (``paper / this run``
    cells); the others make the secondary table of this run's values.
    """
    missing = [c for c in LONG_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"not a long comparison table: missing columns {missing}")
    cell_dec, col_dec = paper_decimals(artifacts, paper) if artifacts else ({}, {})
    units: dict[str, str] = {}
    for col, unit in zip(table["column"], table["unit"] if "unit" in table.columns else [""] * len(table)):
        if not _missing(unit):
            units.setdefault(col, unit)
    cells = {(r.row, r.column): r for r in table.itertuples(index=False)}
    with_paper = {r.column for r in table.itertuples(index=False) if not _missing(r.paper)}
    main_blocks: dict[tuple[str, ...], list[str]] = {}
    extra_blocks: dict[tuple[str, ...], list[str]] = {}
    for row in _order(table["row"]):
        cols = _order(table.loc[table.row == row, "column"])
        for blocks, key in ((main_blocks, [c for c in cols if c in with_paper]),
                            (extra_blocks, [c for c in cols if c not in with_paper])):
            if key:
                blocks.setdefault(tuple(key), []).append(row)
    main = []
    for cols, rows in main_blocks.items():
        records = [
            {"": r, **{c: _pair_text(cells[(r, c)], cell_dec.get((r, c), col_dec.get(c)),
                                     is_comparable(c, units.get(c, ""), comparable)) for c in cols}}
            for r in rows
        ]
        main.append(pd.DataFrame.from_records(records, columns=["", *cols]))
    extra = []
    for cols, rows in _merge_subsets(extra_blocks).items():
        records = [{"": r, **{c: fixed_text(cells[(r, c)].this_run, col_dec.get(c)) if (r, c) in cells else MISSING
                              for c in cols}} for r in rows]
        records = [rec for rec in records if any(rec[c] != MISSING for c in cols)]
        if records:
            extra.append(_fold_intervals(pd.DataFrame.from_records(records, columns=["", *cols])))
    return main, extra


def _merge_subsets(blocks: dict[tuple[str, ...], list[str]]) -> dict[tuple[str, ...], list[str]]:
    """Rows whose columns are a subset of another block's join that block (its cells left empty)."""
    merged: dict[tuple[str, ...], list[str]] = {}
    for cols, rows in blocks.items():
        home = next((k for k in blocks if k != cols and set(cols) < set(k)), cols)
        merged.setdefault(home, []).extend(rows)
    return merged


def _pair_text(cell: Any, decimals: int | None, comparable: bool) -> str:
    paper = MISSING if _missing(cell.paper) or cell.paper == "-" else cell.paper
    paper_text = paper if isinstance(paper, str) else fixed_text(paper, decimals)
    text = f"{paper_text} / {fixed_text(cell.this_run, decimals)}"
    if comparable and isinstance(cell.match, bool):
        text += " ✓" if cell.match else " ✗"
    return text


def render_comparison(
    table: pd.DataFrame,
    *,
    artifacts: Sequence[str] = (),
    comparable: Collection[str] = (),
    paper: pd.DataFrame | None = None,
) -> list[str]:
    """Markdown blocks for a long comparison: caption, paper-shaped tables, this-run-only tables."""
    main, extra = wide_tables(table, artifacts=artifacts, comparable=comparable, paper=paper)
    blocks = []
    caption = _scale_caption(table)
    if caption:
        blocks.append(f"*{caption}.*")
    blocks.append(f"*{CELL_LEGEND}*")
    blocks += [to_markdown(f) for f in main]
    if extra:
        blocks.append("### This run only (not in the paper)")
        blocks += [to_markdown(f) for f in extra]
    return blocks


def render_frame(frame: pd.DataFrame) -> list[str]:
    """Markdown blocks for any other result table: a constant ``scale`` column becomes the caption,
    ``delta`` is left to the CSV, and numbers are shortened with :func:`default_text`."""
    out = frame.copy()
    blocks = []
    if "scale" in out.columns and out["scale"].nunique(dropna=False) == 1:
        blocks.append(f"*Scale of this run: {out['scale'].iloc[0]}.*")
        out = out.drop(columns=["scale"])
    out = out.drop(columns=[c for c in ("delta",) if c in out.columns])
    texts = out.astype(object).map(lambda x: "" if _missing(x) else default_text(x))
    blocks.append(to_markdown(texts))
    return blocks
