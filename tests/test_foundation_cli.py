"""The command line: subcommands are listed and do real work."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atp_repro import cli
from atp_repro.paths import repo_root
from atp_repro.training_config import format_value, load_training_config

SUBCOMMANDS = ("info", "paper-numbers", "reproduce", "run-notebooks", "show-config")


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_python_dash_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["atp_repro", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("atp_repro", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_console_script() -> None:
    script = Path(sys.executable).parent / "atp-repro"
    if not script.exists():
        pytest.skip("package not installed with pip (make installs it)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert all(name in out.stdout for name in SUBCOMMANDS)


def test_show_config_prints_the_resolved_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show-config", "configs/mini_world.yaml"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("\n# changes")[0])
    mini = load_training_config(repo_root() / "configs" / "mini_world.yaml")
    assert resolved["atp"]["n_target"] == mini.atp.n_target
    assert resolved["training"]["lr_llm"] == mini.training.lr_llm
    assert f"training.lr_llm: 2e-5 -> {format_value('training.lr_llm', mini.training.lr_llm)}" in out
    assert cli.main(["show-config", "configs/llava15_7b_atp.yaml", "--format", "table"]) == 0
    assert "training.lr_llm" in capsys.readouterr().out


def test_show_config_reports_bad_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(Path("configs/llava15_7b_atp.yaml").read_text())
    data["training"]["lr_llm"] = -1
    bad.write_text(yaml.safe_dump(data))
    assert cli.main(["show-config", str(bad)]) == 2
    assert "training.lr_llm: -1 is out of range" in capsys.readouterr().err


def test_paper_numbers_and_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["paper-numbers", "--artifact", "supp_table5"]) == 0
    assert "GPT-4V" in capsys.readouterr().out
    assert cli.main(["info"]) == 0
    assert '"torch"' in capsys.readouterr().out


def test_run_notebooks_list_shows_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run-notebooks", "--profile", "smoke", "--list"]) == 0
    out = capsys.readouterr().out
    assert "supp_table1_hyperparameters: run" in out and "build/notebooks/smoke" in out
    assert cli.main(["run-notebooks", "--only", "supp_table1", "--list"]) == 2
    assert "did you mean 'supp_table1_hyperparameters'" in capsys.readouterr().err


def test_subcommands_plug_in() -> None:
    @cli.subcommand("test-echo", help="echo for the test")
    def _echo(parser):
        parser.add_argument("word")
        return lambda args: 0 if args.word == "hi" else 3

    try:
        assert cli.main(["test-echo", "hi"]) == 0
        assert cli.main(["test-echo", "no"]) == 3
    finally:
        cli._REGISTRY.pop("test-echo")
