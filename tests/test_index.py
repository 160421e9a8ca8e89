"""index.ipynb, the page `make lab` opens: every notebook with its table, figures and run times."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from atp_repro import git_filter, index
from atp_repro import notebook_runner as nr
from atp_repro.cli import main


def _markdown(text: str) -> str:
    nb = json.loads(text)
    assert {c["cell_type"] for c in nb["cells"]} == {"markdown"}  # nothing to execute
    return "\n".join("".join(c["source"]) for c in nb["cells"])


def test_index_links_every_notebook_its_tables_figures_and_the_claims(repo_root: Path) -> None:
    md = _markdown(index.render(repo_root))
    notebooks = nr.discover_notebooks(repo_root)
    assert notebooks
    for notebook in notebooks:
        assert f"](notebooks/{notebook.name})" in md, notebook.name
        assert f"](tables/{notebook.stem}.md)" in md, notebook.stem
    assert "](figures/supp_figure1_examples.png)" in md and "](figures/supp_figure1_examples.pdf)" in md
    assert "](tables/claims_summary.md)" in md
    rows = [line for line in md.splitlines() if line.startswith("| [")]
    assert len(rows) == len(notebooks)
    assert all(re.search(r"\| \d+ (s|min \d\d s) \| \d+ (s|min \d\d s) \|$", r) for r in rows), rows


def test_committed_index_is_current(repo_root: Path) -> None:
    assert (repo_root / index.INDEX_NAME).read_text(encoding="utf-8") == index.render(repo_root), (
        "index.ipynb is out of date: run 'atp-repro index'"
    )


def test_a_new_notebook_appears_in_the_index(fake_repo: Path, notebook_factory) -> None:
    notebook_factory(fake_repo / "notebooks" / "zz_new.ipynb")
    md = _markdown(index.render())
    assert "[zz_new](notebooks/zz_new.ipynb) | — | — | not measured | not measured |" in md
    assert main(["index"]) == 0 and (fake_repo / "index.ipynb").is_file()


def test_the_index_is_not_run_and_is_clean(repo_root: Path) -> None:
    path = repo_root / index.INDEX_NAME
    assert path not in nr.discover_notebooks(repo_root)
    assert all(j.notebook != path for j in nr.plan_runs("smoke"))
    text = path.read_text(encoding="utf-8")
    clean = git_filter.filter_settings()["filter.nbstripout.clean"]
    stripped = subprocess.run(clean, shell=True, input=text, capture_output=True, text=True, check=True).stdout
    assert stripped == text  # the nbstripout git filter leaves it unchanged


def _sidecar(tables: Path, name: str, start: str, end: str, wall: float) -> None:
    record = {"name": name, "started_at": start, "finished_at": end, "wall_time_s": wall}
    (tables / f"{name}.provenance.json").write_text(json.dumps(record))


def test_run_times_span_from_the_previous_notebook_end(tmp_path: Path) -> None:
    _sidecar(tmp_path, "b", "2026-01-01T10:10:00+00:00", "2026-01-01T10:10:01+00:00", 1.0)  # timed block only
    _sidecar(tmp_path, "a", "2026-01-01T10:00:00+00:00", "2026-01-01T10:05:00+00:00", 300.0)
    assert index.run_times_from_provenance(tmp_path) == {"a": 300.0, "b": 301.0}


def test_record_run_times_fills_one_column(fake_repo: Path) -> None:
    tables = fake_repo / "tables"
    tables.mkdir()
    _sidecar(tables, "a", "2026-01-01T10:00:00+00:00", "2026-01-01T10:00:30+00:00", 30.0)
    index.record_run_times("cold")
    _sidecar(tables, "a", "2026-01-01T11:00:00+00:00", "2026-01-01T11:00:05+00:00", 5.0)
    index.record_run_times("warm")
    assert (fake_repo / index.RUN_TIMES).read_text() == "notebook,cold_s,warm_s\na,30.0,5.0\n"
    assert index.read_run_times(fake_repo / index.RUN_TIMES) == {"a": (30.0, 5.0)}
    with pytest.raises(ValueError, match="cache='hot'"):
        index.record_run_times("hot")


def test_a_malformed_run_times_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "times.csv"
    path.write_text("notebook,cold_s,warm_s\na,ten,\n")
    with pytest.raises(ValueError, match=r"times\.csv, line 2: seconds must be numbers"):
        index.read_run_times(path)
    path.write_text("notebook,cold\na,1\n")
    with pytest.raises(ValueError, match=r"times\.csv: columns must be"):
        index.read_run_times(path)


def test_make_lab_opens_the_index_at_the_repository_root(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    recipe = re.search(r"^lab: .*?\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no 'lab' target"
    lines = recipe.group(1)
    assert "-m atp_repro index" in lines
    assert "--ServerApp.root_dir=." in lines and "--LabApp.default_url=/lab/tree/index.ipynb" in lines
    assert "notebook-dir=notebooks" not in lines
