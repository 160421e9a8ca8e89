"""Bad CLI values fail before any work starts, with a message naming the option (a table of cases)."""

from __future__ import annotations

import time

import pytest

import atp_repro.efficiency.strategies  # noqa: F401  (heavy imports done once, outside the timed calls)
import atp_repro.mini.experiments  # noqa: F401
from atp_repro.cli import main

CASES = [
    # (argv, text the error must contain)
    (["train", "--stage", "atp", "--steps", "0"], "--steps"),
    (["train", "--stage", "atp", "--steps", "-5"], "--steps"),
    (["train", "--steps", "10"], "--steps applies to --stage atp"),
    (["train", "--frozen-lm"], "--frozen-lm applies to --stage atp"),
    (["train", "--tokens-576", "88"], "--tokens-576 applies to"),
    (["train", "--stage", "atp", "--tokens-576", "0"], "--tokens-576"),
    (["train", "--stage", "atp", "--tokens-576", "-3"], "--tokens-576"),
    (["train", "--stage", "atp", "--tokens-576", "inf"], "--tokens-576"),
    (["train", "--stage", "atp", "--tokens-576", "nan"], "--tokens-576"),
    (["train", "--stage", "atp", "--tokens-576", "1e6"], "--tokens-576"),
    (["train", "--stage", "atp", "--tokens-576", "many"], "--tokens-576"),
    (["train", "--stage", "final"], "--stage"),
    (["train", "--steps", "1.5"], "--steps"),
    (["eval", "--n-test", "0"], "--n-test"),
    (["eval", "--n-test", "-5"], "--n-test"),
    (["eval", "--n-test", "nan"], "--n-test"),
    (["eval", "--baseline", "fastv", "--stage", "atp"], "--baseline"),
    (["eval", "--baseline", "fastvv"], "--baseline"),
    (["eval", "--baseline", "fastv", "--tokens-576", "10"], "--tokens-576"),
    (["eval", "--baseline", "fastv", "--tokens-576", "inf"], "--tokens-576"),
    (["eval", "--baseline", "visionzip", "--tokens-576", "4"], "--tokens-576"),
    (["train", "--config", "configs/llava15_7b_atp.yaml"], "model.name_or_path"),  # the placeholder path
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_values_fail_fast_naming_the_option(argv, expected, capsys):
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors (type, choices)
        code = exit_.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code not in (0, None), (argv, err)
    assert expected in err, err
    assert elapsed < 1.0, f"{argv}: {elapsed:.1f} s (something started work before failing)"


MORE_CASES = [
    (["run-notebooks", "--only", "supp_table1_hyperparameters", "-p", "k", "[1,"], "-p k"),
    (["run-notebooks", "--only", "supp_table1_hyperparameters", "--cell-timeout", "0"], "--cell-timeout"),
    (["run-notebooks", "--only", "supp_table1_hyperparameters", "--jobs", "0"], "--jobs"),
    (["run-notebooks", "-p", "n_tset", "10"], "n_tset"),
    (["run-notebooks", "--only", "supp_table_1"], "no such notebook"),
    (["bench", "--output", "."], "--output"),
    (["bench", "--output", "no/such/folder/x.csv"], "--output"),
    (["bench", "--fixed-keep", "-1", "2", "3"], "--fixed-keep"),
    (["eval", "--out", "no/such/folder/x.csv"], "--out"),
    (["eval", "--out", "."], "--out"),
    (["reproduce", "--jobs", "0"], "--jobs"),
    (["reproduce", "-p", "n_tset", "3"], "n_tset"),
    (["reproduce", "--cell-timeout", "-1"], "--cell-timeout"),
    (["verify", "--root", "no/such/checkout"], "no manifest"),
    (["index", "--record-times", "hot"], "--record-times"),
    (["claims-summary", "--tables", "no/such"], "--tables"),
    (["paper-numbers", "--artifact", "supp_table99"], "supp_table99"),
]


@pytest.mark.parametrize("argv, expected", MORE_CASES, ids=[" ".join(a) for a, _ in MORE_CASES])
def test_more_bad_values_fail_fast(argv, expected, capsys):
    test_bad_values_fail_fast_naming_the_option(argv, expected, capsys)


@pytest.mark.parametrize("text, expected", [
    ("a: [1,\n", "not valid YAML"),
    ("name: x\nname: y\n", "duplicate key 'name'"),
    ("name: x\nscale: mini\ninherits: self.yaml\n", "cannot inherit itself"),
])
def test_show_config_reports_bad_files_without_a_traceback(tmp_path, capsys, text, expected):
    path = tmp_path / "self.yaml"
    path.write_text(text)
    assert main(["show-config", str(path)]) == 2
    assert expected in capsys.readouterr().err
    assert main(["show-config", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
