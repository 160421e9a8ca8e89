"""The paper-numbers file, cross-checked against the source texts, and the comparison builder."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from atp_repro.paper import (
    ARTIFACTS,
    COMPARISON_COLUMNS,
    PAPER_COLUMNS,
    Claim,
    PaperNumbersError,
    compare_with_paper,
    format_number,
    load_paper_numbers,
    paper_value,
    write_comparison,
)

EXPECTED_CELLS = {
    "supp_table1": 10,
    "supp_table2": 18,
    "supp_table3": 16,
    "supp_table4": 16,
    "supp_table5": 5,
    "supp_table6": 20,
    "supp_table7": 54,
    "supp_table8": 21,
    "main_table1": 71,
    "main_table6": 3,
}


@pytest.fixture(scope="module")
def numbers() -> pd.DataFrame:
    return load_paper_numbers()


def test_file_layout(numbers: pd.DataFrame) -> None:
    assert tuple(numbers.columns) == PAPER_COLUMNS
    assert set(numbers.artifact) == set(ARTIFACTS)
    assert numbers.groupby("artifact").size().to_dict() == EXPECTED_CELLS
    assert (numbers.source != "").all()


def test_value_agrees_with_printed_text(numbers: pd.DataFrame) -> None:
    for r in numbers.itertuples():
        m = re.fullmatch(r"(-?[\d,]+(?:\.\d+)?(?:e-?\d+)?)(?:%|\*| s)?", r.value_text)
        if m:
            assert r.value == pytest.approx(float(m.group(1).replace(",", ""))), r
        else:
            assert math.isnan(r.value), r
            assert r.value_text == "-" or r.notes, f"text cell without a note: {r}"


def test_spec_remarks_are_recorded(numbers: pd.DataFrame) -> None:
    avg = numbers[(numbers.artifact == "main_table1") & (numbers.row == "ATP-LLaVA (144)")]
    note = avg[avg.column == "Avg. Rate"].notes.item()
    assert "97.99" in note
    sqa = numbers[(numbers.column == "SQA-I") & numbers.row.str.startswith("LLaVA-1.5")]
    assert len(sqa) == 2 and all("13B" in n for n in sqa.notes)


def test_recomputed_atp144_average_is_9799(numbers: pd.DataFrame) -> None:
    benchmarks = ["GQA", "MMB", "MME", "POPE", "SEED", "SQA-I", "VQAv2"]
    ub = [
        paper_value("main_table1", "LLaVA-1.5-7B (Upper Bound)", b, paper=numbers)
        for b in benchmarks
    ]
    atp = [paper_value("main_table1", "ATP-LLaVA (144)", b, paper=numbers) for b in benchmarks]
    mean = sum(a / u for a, u in zip(atp, ub, strict=True)) / len(benchmarks) * 100
    assert round(mean, 2) == 97.99
    assert paper_value("main_table1", "ATP-LLaVA (144)", "Avg. Rate", paper=numbers) == 98.1


def test_paper_value_errors_name_the_options(numbers: pd.DataFrame) -> None:
    with pytest.raises(PaperNumbersError, match="rows of supp_table8"):
        paper_value("supp_table8", "ATP", "MMB", paper=numbers)
    with pytest.raises(PaperNumbersError, match="unknown artifact"):
        load_paper_numbers("supp_table9")


def test_malformed_file_is_rejected(tmp_path: Path, numbers: pd.DataFrame) -> None:
    bad = numbers.astype(str).replace("nan", "")
    pd.concat([bad, bad.head(1)]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(PaperNumbersError, match="duplicate cells"):
        load_paper_numbers(path=tmp_path / "dup.csv")
    bad.drop(columns=["unit"]).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(PaperNumbersError, match="missing columns"):
        load_paper_numbers(path=tmp_path / "cols.csv")


# -- cross-checks against the source texts ------------------------------------------------------


def _cells(line: str) -> list[str]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return [re.sub(r"<[^>]+>|\s*\[\d+\]$", "", c).strip() for c in cells]


def _table_block(text: str, number: int) -> list[str]:
    """Rows of the pipe table printed just before the caption 'Table <number>.'."""
    lines = text.splitlines()
    caption = next(i for i, line in enumerate(lines) if line.startswith(f"Table {number}. "))
    block: list[str] = []
    for line in reversed(lines[:caption]):
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    return block[::-1]


@pytest.mark.parametrize("number", range(1, 9))
def test_supplementary_numbers_match_the_source_text(
    supplementary_text: str, numbers: pd.DataFrame, number: int
) -> None:
    block = _table_block(supplementary_text, number)
    rows = {_cells(line)[0]: _cells(line) for line in block}
    every_cell = {c for line in block for c in _cells(line)}
    mine = numbers[numbers.artifact == f"supp_table{number}"]
    assert len(mine) == EXPECTED_CELLS[f"supp_table{number}"]
    checked_by_row = 0
    for r in mine.itertuples():
        if r.row in rows:  # same row label as printed: the value must be in that row
            assert r.value_text in rows[r.row], (r.row, r.column, r.value_text, rows[r.row])
            checked_by_row += 1
        else:  # synthesised row label (Tables 4-6): the value must be in the table
            assert r.value_text in every_cell, (r.row, r.column, r.value_text)
    if number in (1, 2, 3, 7, 8):
        assert checked_by_row == len(mine)


@pytest.mark.parametrize(
    ("number", "printed_order"),
    [
        (4, ["Token", "Avg. Rate", "Language Model", "Training Wall-time"]),
        (6, ["N_target", "lambda_ATP", "lambda_target", "Token", "Average Rate"]),
    ],
)
def test_synthesised_rows_match_a_printed_row(
    supplementary_text: str, numbers: pd.DataFrame, number: int, printed_order: list[str]
) -> None:
    """Tables 4 and 6 have no row labels in print: each of our rows is a whole printed row."""
    block = [_cells(line) for line in _table_block(supplementary_text, number)]
    mine = numbers[numbers.artifact == f"supp_table{number}"]
    for row, cells in mine.groupby("row", sort=False):
        printed = cells.set_index("column").value_text[printed_order].tolist()
        assert printed in block, (row, printed)


def test_main_paper_facts_match_spec(spec_text: str, numbers: pd.DataFrame) -> None:
    spec = " ".join(spec_text.split())
    main1 = numbers[numbers.artifact == "main_table1"]
    for row, cells in main1.groupby("row", sort=False):
        scores = cells[~cells.column.isin(["Token", "Avg. Rate"])]
        if row.endswith("(Upper Bound)"):  # printed with labels: "GQA 62.0, MMB 64.3, ..."
            labelled = ", ".join(
                f"{c} {v}" for c, v in zip(scores.column, scores.value_text, strict=True)
            )
            assert labelled in spec, row
            continue
        values = scores.value_text.tolist()
        assert ", ".join(values) in spec, (row, values)
        rate = cells[cells.column == "Avg. Rate"].value_text.tolist()
        if rate:
            assert f"{', '.join(values)}, Avg {rate[0]}" in spec, row
    for r in numbers[numbers.artifact == "main_table6"].itertuples():
        assert f"{r.column} {r.value_text}" in spec, r


# -- comparison builder -------------------------------------------------------------------------


def _paper() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "artifact": ["supp_table8"] * 4,
            "row": ["A", "A", "A", "B"],
            "column": ["MMB", "MME", "Note", "MMB"],
            "value": [64.3, 1510.7, math.nan, math.nan],
            "value_text": ["64.3", "1510.7", "bf16", "-"],
            "unit": ["score", "score", "", "score"],
            "source": ["s"] * 4,
            "notes": [""] * 4,
        }
    )


def test_compare_with_paper_cell_by_cell() -> None:
    run = pd.DataFrame(
        {
            "row": ["A", "A", "A", "B", "C"],
            "column": ["MMB", "MME", "Note", "MMB", "MMB"],
            "value": [64.3, 1500.0, None, 50.0, 10.0],
            "value_text": [None, None, "fp32", None, None],
        }
    )
    table = compare_with_paper("supp_table8", run, scale="mini", paper=_paper())
    assert tuple(table.columns) == COMPARISON_COLUMNS
    rows = {(r.row, r.column): r for r in table.itertuples()}
    assert rows["A", "MMB"].match is True and rows["A", "MMB"].delta == 0
    assert rows["A", "MME"].match is False and rows["A", "MME"].delta == pytest.approx(-10.7)
    assert rows["A", "Note"].paper == "bf16" and rows["A", "Note"].match is False
    assert rows["B", "MMB"].paper == "-" and rows["B", "MMB"].match is None
    assert pd.isna(rows["C", "MMB"].paper) and rows["C", "MMB"].match is None
    assert set(table.scale) == {"mini"}


def test_compare_reports_cells_missing_from_the_run() -> None:
    run = pd.DataFrame({"row": ["A"], "column": ["MMB"], "value": [64.3]})
    table = compare_with_paper("supp_table8", run, scale="mini", paper=_paper())
    missing = table[(table.row == "A") & (table.column == "MME")].iloc[0]
    assert pd.isna(missing.this_run) and missing.match is None


def test_compare_treats_a_nan_value_as_missing() -> None:
    # e.g. a spread over a single seed: not computable, so shown as missing, never as the text "nan"
    run = pd.DataFrame({"row": ["A", "C"], "column": ["MMB", "SD"], "value": [math.nan, math.nan]})
    table = compare_with_paper("supp_table8", run, scale="mini", paper=_paper())
    for row, column in (("A", "MMB"), ("C", "SD")):
        cell = table[(table.row == row) & (table.column == column)].iloc[0]
        assert cell.this_run is None and cell.match is None


def test_compare_validates_its_input() -> None:
    with pytest.raises(ValueError, match="missing column 'value'"):
        compare_with_paper("supp_table8", pd.DataFrame({"row": [], "column": []}), scale="mini")
    dup = pd.DataFrame({"row": ["A", "A"], "column": ["MMB", "MMB"], "value": [1.0, 2.0]})
    with pytest.raises(ValueError, match="duplicate cells"):
        compare_with_paper("supp_table8", dup, scale="mini", paper=_paper())


def test_write_comparison_is_deterministic_and_atomic(tmp_path: Path) -> None:
    run = pd.DataFrame({"row": ["A", "A"], "column": ["MMB", "MME"], "value": [64.3, 1500.0]})
    table = compare_with_paper("supp_table8", run, scale="mini", paper=_paper())
    claims = [Claim("MMB is reproduced", True, "64.3 vs 64.3"), Claim("MME is reproduced", False)]
    kwargs = {"title": "T", "claims": claims, "notes": ["n"], "output_dir": tmp_path}
    first = write_comparison(table, "t8", **kwargs)
    before = {k: p.read_bytes() for k, p in first.items()}
    second = write_comparison(table, "t8", **kwargs)
    assert {k: p.read_bytes() for k, p in second.items()} == before
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "t8.claims.csv",
        "t8.csv",
        "t8.md",
    ]
    md = first["md"].read_text()
    assert "| MMB is reproduced | holds | 64.3 vs 64.3 |" in md
    assert "| MME is reproduced | does not hold |  |" in md
    csv = pd.read_csv(first["csv"])
    assert tuple(csv.columns) == COMPARISON_COLUMNS


def test_write_comparison_rejects_odd_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name="):
        write_comparison(pd.DataFrame(), "../escape", title="t", output_dir=tmp_path)


def test_claim_validation() -> None:
    assert Claim("x", None).verdict == "not checked"
    with pytest.raises(ValueError, match="non-empty"):
        Claim("", True)
    with pytest.raises(ValueError, match="True, False or None"):
        Claim("x", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2e-5, "2e-5"),
        (1e-4, "1e-4"),
        (0.03, "0.03"),
        (128, "128"),
        (1510.7, "1510.7"),
        (None, ""),
        (True, "yes"),
    ],
)
def test_format_number(value: object, text: str) -> None:
    assert format_number(value) == text
