"""What executed notebooks show: a figure, and every claim in full.

The checks run on the real executed smoke notebooks in the last step of ``make test`` (the root
``conftest.py`` adds them when pytest collects ``build/notebooks/smoke``); here they are checked
on small synthetic notebooks, so that they can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

from atp_repro import notebook_checks as nc
from atp_repro import notebook_runner as nr

LONG = "A claim that is much longer than the fifty characters pandas shows by default, in full"


def _executed(folder: Path, outputs: list[dict], claims: list[str]) -> Path:
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": outputs}], "metadata": {},
          "nbformat": 4, "nbformat_minor": 5}
    path = folder / "nb.ipynb"
    path.write_text(json.dumps(nb))
    (folder / "tables").mkdir(exist_ok=True)
    csv = "claim,holds,verdict,evidence\n" + "".join(f'"{c}",true,holds,\n' for c in claims)
    (folder / "tables" / "nb.claims.csv").write_text(csv)
    return path


def _display(kind: str, text: str) -> dict:
    return {"output_type": "display_data", "metadata": {}, "data": {kind: text}}


def test_a_notebook_with_a_figure_and_full_claims_passes(tmp_path: Path) -> None:
    md = _display("text/markdown", f"| claim | verdict |\n|---|---|\n| {LONG} | holds |")
    path = _executed(tmp_path, [_display("image/png", "iVBORw0KGgo="), md], [LONG])
    assert nc.output_problems(path) == []


def test_a_cut_claim_or_a_missing_figure_fails(tmp_path: Path) -> None:
    cut = _display("text/plain", LONG[:47] + "...")
    problems = nc.output_problems(_executed(tmp_path, [cut], [LONG]))
    assert any("image/png" in p for p in problems)
    assert any("not shown in full" in p for p in problems)


def test_html_escaped_claims_count_as_shown() -> None:
    nb = {"cells": [{"cell_type": "code", "outputs": [_display("text/html", "<td>rate &gt;= 95%</td>")]}]}
    assert nc.missing_claims(nb, ["rate >= 95%", "other"]) == ["other"]


def test_the_checks_apply_to_the_smoke_notebooks_only(tmp_path: Path) -> None:
    smoke = nr.executed_dir("smoke")
    assert nc.is_executed_smoke_notebook(smoke / "x.ipynb")
    assert not nc.is_executed_smoke_notebook(smoke / "tables" / "x.csv")
    assert not nc.is_executed_smoke_notebook(tmp_path / "x.ipynb")
    assert not nc.is_executed_smoke_notebook(Path("notebooks") / "x.ipynb")
