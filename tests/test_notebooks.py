"""Notebook hygiene, runner coverage, and the runner itself.

Committed notebooks carry no outputs, start with exactly one ``parameters`` cell of literals
(which papermill can parse and which declares ``output_dir``), use the ``python3`` kernel, and
are all executed by the runner in every profile (``make test`` runs the smoke profile and nbval
over its output folder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from atp_repro import notebook_runner as nr

NOTEBOOKS = nr.discover_notebooks()


def test_there_are_notebooks(repo_root: Path) -> None:
    assert sorted((repo_root / "notebooks").glob("*.ipynb")) == NOTEBOOKS
    assert repo_root / "notebooks" / "supp_table1_hyperparameters.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(notebook: Path) -> None:
    assert nr.hygiene_problems(notebook) == []


def test_no_orphan_or_misplaced_params_files(repo_root: Path) -> None:
    assert nr.orphan_params_files() == []
    assert nr.unknown_profile_dirs() == []


@pytest.mark.parametrize("profile", sorted(nr.PROFILES))
def test_runner_covers_every_notebook(profile: str) -> None:
    jobs = nr.plan_runs(profile)
    assert [j.notebook for j in jobs] == NOTEBOOKS
    for job in jobs:
        assert job.output == nr.executed_dir(profile) / job.notebook.name
        assert "output_dir" in job.parameters
        if profile == "real":
            assert job.params_file is not None or job.skip_reason
        else:
            assert job.skip_reason is None
    if profile != "mini":  # CI and GPU runs never write into the committed tables/
        assert all(j.parameters["output_dir"] for j in jobs)


def test_make_test_runs_the_smoke_profile_then_nbval_over_it(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    recipe = re.search(r"^test: .*?\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no 'test' target"
    lines = recipe.group(1)
    assert "-m pytest" in lines and "run-notebooks --profile smoke" in lines
    smoke = re.search(r"^SMOKE\s*:=\s*(\S+)", makefile, re.M).group(1)
    assert repo_root / smoke == nr.executed_dir("smoke")
    assert "--nbval-lax" in makefile and "$(NBVAL) $(SMOKE)" in lines
    ci = (repo_root / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci
    assert "make test" in (repo_root / "README.md").read_text()


# -- the hygiene check itself fails on bad notebooks ---------------------------------------------


def test_hygiene_accepts_a_clean_notebook(tmp_path: Path, notebook_factory) -> None:
    assert nr.hygiene_problems(notebook_factory(tmp_path / "ok.ipynb")) == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"outputs": True}, "has outputs"),
        ({"outputs": True}, "execution count"),
        ({"tag": False}, "no cell tagged 'parameters'"),
        ({"kernel": "myproject-env"}, "kernelspec name is 'myproject-env'"),
        ({"parameters": "import os\noutput_dir = ''\n"}, "only 'name = <literal>'"),
        ({"parameters": "n = 2 * 3\noutput_dir = ''\n"}, "'n' is not a literal"),
        ({"parameters": "n = 1\n"}, "does not declare 'output_dir'"),
        ({"parameters": 'output_dir = ""  # "" = root\n'}, "papermill cannot parse"),
        ({"parameters": "output_dir = (\n"}, "not valid Python"),
    ],
)
def test_hygiene_fails_on_a_bad_notebook(
    tmp_path: Path, notebook_factory, options: dict, expected: str
) -> None:
    problems = nr.hygiene_problems(notebook_factory(tmp_path / "bad.ipynb", **options))
    assert any(expected in p for p in problems), problems


def test_hygiene_fails_when_parameters_is_not_the_first_code_cell(
    tmp_path: Path, notebook_factory
) -> None:
    path = notebook_factory(tmp_path / "bad.ipynb")
    nb = json.loads(path.read_text())
    nb["cells"].reverse()
    path.write_text(json.dumps(nb))
    assert any("must be the first" in p for p in nr.hygiene_problems(path))
    nb["cells"][0]["metadata"]["tags"] = ["parameters"]
    path.write_text(json.dumps(nb))
    assert any("exactly one is allowed" in p for p in nr.hygiene_problems(path))


def test_hygiene_fails_on_a_params_file_with_an_undeclared_parameter(
    tmp_path: Path, notebook_factory
) -> None:
    path = notebook_factory(tmp_path / "nb.ipynb", parameters="n_steps = 10\noutput_dir = ''\n")
    (tmp_path / "params" / "smoke").mkdir(parents=True)
    (tmp_path / "params" / "smoke" / "nb.yaml").write_text("n_step: 2\n")
    problems = nr.hygiene_problems(path)
    assert any("'n_step' is not declared" in p and "did you mean 'n_steps'" in p for p in problems)


def test_hygiene_fails_on_the_real_bad_notebook_in_a_checkout(
    fake_repo: Path, notebook_factory
) -> None:
    notebook_factory(fake_repo / "notebooks" / "good.ipynb")
    notebook_factory(fake_repo / "notebooks" / "bad.ipynb", outputs=True)
    found = {nb.stem: nr.hygiene_problems(nb) for nb in nr.discover_notebooks()}
    assert found["good"] == [] and found["bad"]


# -- the runner ---------------------------------------------------------------------------------


def test_plan_applies_params_files_and_precedence(fake_repo: Path, notebook_factory) -> None:
    notebook_factory(fake_repo / "notebooks" / "a.ipynb", parameters="n = 1\noutput_dir = ''\n")
    notebook_factory(fake_repo / "notebooks" / "b.ipynb", parameters="n = 1\noutput_dir = ''\n")
    (fake_repo / "notebooks" / "params" / "smoke").mkdir(parents=True)
    (fake_repo / "notebooks" / "params" / "smoke" / "a.yaml").write_text("n: 5\n")
    (fake_repo / "notebooks" / "params" / "real").mkdir(parents=True)
    (fake_repo / "notebooks" / "params" / "real" / "b.yaml").write_text("n: 7\n")
    smoke = {j.name: j for j in nr.plan_runs("smoke")}
    assert smoke["a"].parameters == {"n": 5, "output_dir": "build/notebooks/smoke"}
    assert smoke["b"].parameters == {"output_dir": "build/notebooks/smoke"}  # defaults
    real = {j.name: j for j in nr.plan_runs("real")}
    assert real["a"].skip_reason and real["b"].parameters["n"] == 7
    mini = nr.plan_runs("mini", overrides={"n": 3})
    assert all(j.parameters == {"n": 3, "output_dir": ""} for j in mini)
    assert [j.name for j in nr.plan_runs("smoke", only=["b.ipynb"])] == ["b"]
    with pytest.raises(ValueError, match="profile='gpu'"):
        nr.plan_runs("gpu")


def test_runner_executes_reports_failures_and_continues(fake_repo: Path, notebook_factory) -> None:
    write = (
        "from pathlib import Path\n"
        "import os\n"
        "out = Path(os.environ['ATP_REPRO_ROOT']) / output_dir / 'tables'\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'ok.csv').write_text(f'n\\n{n}\\n')"
    )
    params = "n = 1\noutput_dir = ''\n"
    notebook_factory(fake_repo / "notebooks" / "a_fails.ipynb", parameters=params, body=("1 / 0",))
    notebook_factory(fake_repo / "notebooks" / "b_ok.ipynb", parameters=params, body=(write,))
    jobs = nr.plan_runs("smoke", overrides={"n": 4})
    results = nr.run_notebooks(jobs, echo=lambda *_: None)
    assert [r.status for r in results] == ["failed", "ok"]
    assert "ZeroDivisionError" in results[0].error
    assert (fake_repo / "build/notebooks/smoke/tables/ok.csv").read_text() == "n\n4\n"
    executed = json.loads((fake_repo / "build/notebooks/smoke/b_ok.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
    summary = json.loads((fake_repo / "build/notebooks/smoke/run-summary.json").read_text())
    assert [s["status"] for s in summary] == ["failed", "ok"]


@pytest.mark.slow
def test_table1_notebook_is_deterministic(repo_root: Path, tmp_path: Path) -> None:
    """Two runs of the Table 1 notebook give byte-identical tables (timestamps only in the
    provenance sidecar)."""
    outputs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        jobs = nr.plan_runs("smoke", only=["supp_table1_hyperparameters"], output_dir=str(out))
        jobs = [j.__class__(**{**j.__dict__, "output": out / j.notebook.name}) for j in jobs]
        assert [r.status for r in nr.run_notebooks(jobs, echo=lambda *_: None)] == ["ok"]
        outputs.append(out / "tables")
    names = sorted(p.name for p in outputs[0].iterdir())
    assert "supp_table1_hyperparameters.provenance.json" in names
    for name in names:
        if not name.endswith(".provenance.json"):
            assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_runner_prints_progress_and_no_kernel_noise(fake_repo: Path, notebook_factory, capfd) -> None:
    """Which notebook starts (i of N), how long it took and the elapsed time; the kernel's own
    start-up warnings (e.g. "running over TCP without encryption") stay out of the output."""
    notebook_factory(fake_repo / "notebooks" / "a.ipynb")
    notebook_factory(fake_repo / "notebooks" / "b.ipynb", body=("1 / 0",))
    lines: list[str] = []
    results = nr.run_notebooks(nr.plan_runs("smoke"), echo=lines.append)
    assert [r.status for r in results] == ["ok", "failed"]
    assert lines[0] == "[1/2] a: starting (smoke -> build/notebooks/smoke/a.ipynb)"
    assert re.fullmatch(r"\[1/2\] a: ok in \d+\.\d s \(elapsed \d+\.\d s\)", lines[1])
    assert lines[2].startswith("[2/2] b: starting")
    assert re.match(r"\[2/2\] b: FAILED after \d+\.\d s \(elapsed \d+\.\d s\)\n.*ZeroDivisionError", lines[3], re.S)
    captured = capfd.readouterr()
    assert "IPKernelApp" not in captured.err + captured.out


def test_format_seconds() -> None:
    assert nr.format_seconds(4.26) == "4.3 s"
    assert nr.format_seconds(245.4) == "4 min 05 s"


def test_parallel_runner_reports_each_notebook_and_keeps_the_order(fake_repo: Path, notebook_factory) -> None:
    for name in ("a", "b"):
        notebook_factory(fake_repo / "notebooks" / f"{name}.ipynb")
    lines: list[str] = []
    results = nr.run_notebooks(nr.plan_runs("smoke"), jobs_in_parallel=2, echo=lines.append)
    assert [(r.job.name, r.status) for r in results] == [("a", "ok"), ("b", "ok")]
    assert lines[0] == "running 2 notebooks, 2 at a time"
    assert sorted(line.split(":")[0] for line in lines[1:]) == ["[1/2] a", "[2/2] b"]


def test_a_misspelled_parameter_fails_before_any_notebook_runs():
    from atp_repro.notebook_runner import plan_runs

    with pytest.raises(ValueError, match=r"-p n_tset: parameter 'n_tset' is not declared .*did you mean 'n_test'"):
        plan_runs("mini", overrides={"n_tset": 10})
    with pytest.raises(ValueError, match="components"):  # declared by the ablation only
        plan_runs("mini", only=["supp_table2_additional_benchmarks"], overrides={"components": True})
    jobs = plan_runs("mini", overrides={"components": True})
    given = {job.notebook.stem: "components" in job.parameters for job in jobs}
    assert given["ablation_temperature_and_position_encoding"] and not given["supp_table2_additional_benchmarks"]


def test_a_params_file_with_an_undeclared_key_is_rejected(tmp_path, monkeypatch):
    from atp_repro import notebook_runner

    bad = tmp_path / "supp_table2_additional_benchmarks.yaml"
    bad.write_text("n_tset: 10\n")
    monkeypatch.setattr(notebook_runner, "params_file", lambda nb, profile: bad)
    with pytest.raises(ValueError, match="n_tset"):
        notebook_runner.plan_runs("smoke", only=["supp_table2_additional_benchmarks"])


def test_a_failing_notebook_leaves_its_previous_outputs_untouched(fake_repo: Path, notebook_factory) -> None:
    """All or nothing: new tables and figures of a failed run go, the previous ones come back."""
    write = ("from atp_repro import paths\n"
             "(paths.tables_dir(output_dir) / 'c.csv').write_text('new')\n"
             "(paths.tables_dir(output_dir) / 'c.extra.csv').write_text('new')\n"
             "(paths.figures_dir(output_dir) / 'c_plot.png').write_text('new')")
    notebook_factory(fake_repo / "notebooks" / "c.ipynb", body=(write, "1 / 0"))
    out = fake_repo / "build" / "notebooks" / "smoke"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "c.csv").write_text("old")
    (out / "tables" / "c.provenance.json").write_text("old")
    (out / "tables" / "other.csv").write_text("someone else's")
    results = nr.run_notebooks(nr.plan_runs("smoke"), echo=lambda *_: None)
    assert [r.status for r in results] == ["failed"]
    assert (out / "tables" / "c.csv").read_text() == "old"
    assert (out / "tables" / "c.provenance.json").read_text() == "old"
    assert not (out / "tables" / "c.extra.csv").exists() and not (out / "figures" / "c_plot.png").exists()
    assert (out / "tables" / "other.csv").read_text() == "someone else's"
    # the same notebook without the error replaces its outputs
    notebook_factory(fake_repo / "notebooks" / "c.ipynb", body=(write,))
    assert [r.status for r in nr.run_notebooks(nr.plan_runs("smoke"), echo=lambda *_: None)] == ["ok"]
    assert (out / "tables" / "c.csv").read_text() == "new" and (out / "figures" / "c_plot.png").exists()


def test_a_partial_run_updates_only_its_entries_of_the_run_summary(fake_repo: Path, notebook_factory) -> None:
    for name in ("a", "b"):
        notebook_factory(fake_repo / "notebooks" / f"{name}.ipynb")
    nr.run_notebooks(nr.plan_runs("smoke"), echo=lambda *_: None)
    summary = fake_repo / "build" / "notebooks" / "smoke" / "run-summary.json"
    first = json.loads(summary.read_text())
    assert [row["notebook"] for row in first] == ["a", "b"]
    nr.run_notebooks(nr.plan_runs("smoke", only=["b"]), echo=lambda *_: None)
    second = json.loads(summary.read_text())
    assert [row["notebook"] for row in second] == ["a", "b"]
    assert second[0] == first[0]  # a's entry is kept as it was
