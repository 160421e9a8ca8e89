"""Markdown of the paper-vs-run tables: the paper's wide shape and decimals, match only where it means something."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from atp_repro import paper_render as pr
from atp_repro.paper import compare_with_paper, load_paper_numbers, write_comparison

CELL = re.compile(r"^(?P<paper>\S.*?) / (?P<run>\S+?)(?: [✓✗])?$")


def _decimals(text: str) -> int:
    m = re.fullmatch(r"-?\d+(?:\.(\d+))?", text)
    return len(m.group(1) or "") if m else 0


def _table4(**overrides: float) -> pd.DataFrame:
    """Supplementary Table 4 with many-digit run values, plus cells the paper does not have."""
    paper = load_paper_numbers("supp_table4")
    cells = []
    for r in paper.itertuples():
        value = overrides.get(r.column, 1234.56789 if r.column != "Avg. Rate" else 80.34567)
        cells.append({"row": r.row, "column": r.column, "value": None if r.value_text.isalpha() else value,
                      "value_text": r.value_text if r.value_text.isalpha() else None})
    for row in dict.fromkeys(paper.row):
        cells += [{"row": row, "column": "Avg. Rate, 95% interval low (seeds)", "value": 78.61234},
                  {"row": row, "column": "Avg. Rate, 95% interval high", "value": 82.0},
                  {"row": row, "column": "Seeds", "value": 3.0}]
    return compare_with_paper("supp_table4", pd.DataFrame(cells), scale="mini (grid 12x12, CPU)")


def _cells(md_table: str) -> list[list[str]]:
    lines = [line for line in md_table.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


@pytest.mark.parametrize(("text", "decimals"), [("98.1%", 1), ("4,376 s", 0), ("0.001", 3), ("95.0%", 1),
                                                ("-75%", 0), ("1122*", 0), ("2e-5", None), ("Frozen", None)])
def test_printed_decimals(text: str, decimals: int | None) -> None:
    assert pr.printed_decimals(text) == decimals


def test_the_paper_table_is_wide_in_the_papers_shape() -> None:
    main, extra = pr.wide_tables(_table4(), artifacts=["supp_table4"])
    paper = load_paper_numbers("supp_table4")
    assert len(main) == 1
    assert list(main[0].columns) == ["", *dict.fromkeys(paper.column)]
    assert list(main[0][""]) == list(dict.fromkeys(paper.row))
    assert main[0].loc[0, "Language Model"] == "Frozen / Frozen"
    # cells only this run has: one secondary wide table, the interval folded into one cell
    assert len(extra) == 1 and list(extra[0].columns) == ["", "Avg. Rate, 95% interval", "Seeds"]
    assert set(extra[0]["Avg. Rate, 95% interval"]) == {"78.6–82.0"}


def test_run_values_carry_no_more_decimals_than_the_paper_prints() -> None:
    main, _ = pr.wide_tables(_table4(), artifacts=["supp_table4"])
    texts = {(r[""], c): r[c] for r in main[0].to_dict("records") for c in main[0].columns[1:]}
    assert texts["Frozen LM, 144 tokens", "Avg. Rate"] == "95.0 / 80.3 ✗"
    assert texts["Frozen LM, 144 tokens", "Training Wall-time"] == "5172 / 1235"
    assert texts["Frozen LM, 144 tokens", "Token"] == "144 / 1235"


def test_match_only_for_comparable_quantities() -> None:
    # equal numbers: a rate is marked, a token count or a time at another scale is not
    table = _table4(**{"Token": 144.0, "Avg. Rate": 98.1, "Training Wall-time": 13089.0})
    main, _ = pr.wide_tables(table, artifacts=["supp_table4"])
    row = main[0].set_index("").loc["Trainable LM, 144 tokens"]
    assert row["Avg. Rate"] == "98.1 / 98.1 ✓"
    assert row["Token"] == "144 / 144" and row["Training Wall-time"] == "13089 / 13089"
    assert row["Language Model"] == "Trainable / Trainable"  # a copy of the input: not marked
    named, _ = pr.wide_tables(table, artifacts=["supp_table4"], comparable={"Token"})
    assert named[0].set_index("").loc["Trainable LM, 144 tokens", "Token"] == "144 / 144 ✓"


def test_markdown_has_one_scale_caption_and_no_long_columns(tmp_path: Path) -> None:
    md = write_comparison(_table4(), "t4", title="T4", output_dir=tmp_path, artifacts=["supp_table4"])["md"]
    text = md.read_text()
    assert text.count("mini (grid 12x12, CPU)") == 1
    assert "| row | column |" not in text and "None" not in text and "nan" not in text.lower()
    csv = pd.read_csv(tmp_path / "tables" / "t4.csv")
    assert list(csv.columns) == ["row", "column", "unit", "scale", "paper", "this_run", "delta", "match"]


def test_other_tables_drop_a_constant_scale_and_shorten_numbers() -> None:
    frame = pd.DataFrame({"setting": ["a", "b"], "scale": ["real", "real"], "rate": [96.2994, 0.22081],
                          "lr": [2e-5, 1e-4], "delta": [0.0, 1.0]})
    blocks = pr.render_frame(frame)
    assert blocks[0] == "*Scale of this run: real.*"
    assert _cells(blocks[1]) == [["a", "96.3", "2e-5"], ["b", "0.22", "1e-4"]]


@pytest.mark.parametrize("md", sorted(Path(__file__).parents[1].glob("tables/*.md")), ids=lambda p: p.stem)
def test_committed_tables_print_no_more_digits_than_the_paper(md: Path) -> None:
    text = md.read_text()
    assert not re.search(r"\d\.\d{5,}", text.split("## Claims")[0]), "unrounded numbers"
    for row in _cells(text.split("## Claims")[0]):
        for cell in row[1:]:
            m = CELL.match(cell)
            if m and re.fullmatch(r"-?\d+(\.\d+)?", m["paper"]) and re.fullmatch(r"-?\d+(\.\d+)?", m["run"]):
                assert _decimals(m["run"]) <= _decimals(m["paper"]), (md.name, row[0], cell)


@pytest.mark.parametrize("csv", sorted(Path(__file__).parents[1].glob("tables/*.csv")), ids=lambda p: p.name)
def test_committed_long_tables_are_rendered_wide(csv: Path) -> None:
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if not set(pr.LONG_COLUMNS) <= set(df.columns):
        return
    md = csv.with_suffix(".md").read_text()
    assert "| row | column |" not in md
    paper_columns = list(dict.fromkeys(df.loc[df.paper != "", "column"]))
    assert any(line.startswith("|  | " + " | ".join(paper_columns[:2])) for line in md.splitlines()), csv.name


def test_rows_with_fewer_run_only_cells_join_the_larger_table() -> None:
    table = pd.DataFrame({"row": ["U", "A", "A", "U", "A"], "column": ["Rate", "Rate", "Spatial", "Spatial", "SD"],
                          "unit": ["%"] * 2 + [""] * 3, "scale": ["mini"] * 5, "paper": [100.0, 98.0, None, None, None],
                          "this_run": [100.0, 80.123, 46.47, 57.8, 2.6], "match": [True, False, None, None, None]})
    main, extra = pr.wide_tables(table)
    assert main[0].to_dict("records") == [{"": "U", "Rate": "100 / 100 ✓"}, {"": "A", "Rate": "98 / 80.1 ✗"}]
    assert extra[0].to_dict("records") == [{"": "U", "Spatial": "57.8", "SD": "–"},
                                           {"": "A", "Spatial": "46.5", "SD": "2.6"}]
