"""tables/claims_summary.md: every notebook's claims and verdicts in one table, with a count line."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
import pytest

from atp_repro import claims_summary as cs
from atp_repro import verify
from atp_repro.cli import main
from atp_repro.paper import Claim, write_comparison

A_CLAIMS = [
    Claim("More tokens answer better", True, "+15 points"),
    Claim("Thresholds | learn", False, "0.03 vs 0.10"),
    Claim("2-D ids help", None, "-0.5 to +3.6", inconclusive=True),
]
B_CLAIMS = [Claim("Config equals Table 1", True, "10/10 rows, e.g. 2e-5, 128")]


@pytest.fixture
def tables(tmp_path: Path) -> Path:
    """A tables folder written the way the notebooks write theirs."""
    table = pd.DataFrame({"row": ["x"], "value": [1.0]})
    write_comparison(table, "b_table", title="B", claims=B_CLAIMS, output_dir=tmp_path)
    write_comparison(table, "a_table", title="A", claims=A_CLAIMS, output_dir=tmp_path)
    write_comparison(table, "c_no_claims", title="C", output_dir=tmp_path)
    return tmp_path / "tables"


def _union_of_claims_files(tables: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for path in sorted(tables.glob("*.claims.csv")):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        name = path.name.removesuffix(".claims.csv")
        rows += [(name, r.claim, r.verdict, r.evidence) for r in df.itertuples()]
    return rows


def test_summary_rows_are_the_union_of_the_claims_files(tables: Path) -> None:
    written = cs.write_summary(tables)
    assert [p.name for p in written] == ["claims_summary.md", "claims_summary.csv"]
    summary = list(csv.reader(io.StringIO((tables / "claims_summary.csv").read_text())))
    assert summary[0] == ["artifact", "claim", "verdict", "evidence"]
    expected = _union_of_claims_files(tables)
    assert [tuple(r) for r in summary[1:]] == expected and len(expected) == 4
    md = (tables / "claims_summary.md").read_text()
    md_rows = [line for line in md.splitlines() if line.startswith("| [")]
    assert len(md_rows) == 4
    assert md_rows[0].startswith("| [a_table](a_table.md) | More tokens answer better | holds | +15 points |")
    assert "Thresholds \\| learn | does not hold" in md_rows[1]  # a '|' in a cell does not split it
    assert "c_no_claims" not in md


def test_count_line(tables: Path) -> None:
    cs.write_summary(tables)
    md = (tables / "claims_summary.md").read_text()
    assert "**2 of 4 claims hold in the mini world; 1 do not hold; 1 inconclusive.**" in md
    rows = cs.collect(tables)
    assert cs.count_line(rows[3:]) == "1 of 1 claims hold in the mini world"  # absent verdicts not named
    not_checked = [cs.ClaimRow("t", "c", "not checked", "")]
    assert cs.count_line(not_checked) == "0 of 1 claims hold in the mini world; 1 not checked"


def test_summary_is_deterministic_and_regenerated_from_the_files(tables: Path) -> None:
    cs.write_summary(tables)
    first = (tables / "claims_summary.md").read_bytes()
    cs.write_summary(tables)
    assert (tables / "claims_summary.md").read_bytes() == first
    assert cs.stale_files(tables) == []
    path = tables / "b_table.claims.csv"
    path.write_text(path.read_text().replace("true,holds", "false,does not hold"))
    assert cs.stale_files(tables) == ["claims_summary.md", "claims_summary.csv"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("claim,holds,evidence\nx,true,y\n", r"missing column\(s\) \['verdict'\]"),
        ("claim,holds,verdict,evidence\nx,true,holds\n", r"line 2: expected 4 fields"),
        ("claim,holds,verdict,evidence\nx,true,probably,y\n", r"line 2: verdict 'probably' is not one of"),
        ("claim,holds,verdict,evidence\n,true,holds,y\n", r"line 2: empty claim"),
        (b"claim,verdict,evidence\n\xff,holds,y\n", r"cannot be read as CSV"),
    ],
)
def test_a_malformed_claims_file_is_named(tables: Path, content, message: str) -> None:
    bad = tables / "bad_table.claims.csv"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(cs.ClaimsFileError, match=message) as err:
        cs.write_summary(tables)
    assert str(bad) in str(err.value)
    assert not (tables / "claims_summary.md").exists()


def test_cli_writes_the_summary_and_names_a_bad_file(tables: Path, capsys) -> None:
    assert main(["claims-summary", "--tables", str(tables)]) == 0
    assert "2 of 4 claims hold" in capsys.readouterr().out
    assert (tables / "claims_summary.md").is_file()
    (tables / "z.claims.csv").write_text("claim\nx\n")
    assert main(["claims-summary", "--tables", str(tables)]) == 2
    assert "z.claims.csv" in capsys.readouterr().err
    assert main(["claims-summary", "--tables", str(tables / "nope")]) == 2


def test_verify_checks_the_summary_against_the_claims_files(tables: Path) -> None:
    root = tables.parent
    cs.write_summary(tables)
    verify.write_manifest(root)
    assert not any("claims_summary" in f for f in verify.build_manifest(root)["files"])
    assert verify.verify(root) == []
    (tables / "claims_summary.md").write_text("edited by hand\n")
    assert [(d.file, d.where) for d in verify.verify(root)] == [("tables/claims_summary.md", "content")]


def test_committed_summary_is_current(repo_root: Path) -> None:
    tables = repo_root / "tables"
    assert (tables / "claims_summary.md").is_file() and cs.stale_files(tables) == []


def test_run_notebooks_summarises_the_profile_output_folder(fake_repo: Path, notebook_factory, capsys) -> None:
    write = (
        "from pathlib import Path\n"
        "import os\n"
        "out = Path(os.environ['ATP_REPRO_ROOT']) / output_dir / 'tables'\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'nb.claims.csv').write_text('claim,holds,verdict,evidence\\nx,false,does not hold,y\\n')"
    )
    notebook_factory(fake_repo / "notebooks" / "nb.ipynb", body=(write,))
    assert main(["run-notebooks", "--profile", "smoke"]) == 0
    assert "0 of 1 claims hold in the mini world; 1 do not hold" in capsys.readouterr().out
    smoke_tables = fake_repo / "build" / "notebooks" / "smoke" / "tables"
    assert cs.stale_files(smoke_tables) == [] and (smoke_tables / "claims_summary.csv").is_file()
    assert not (fake_repo / "tables").exists()  # the committed tables/ are not touched
