"""Run provenance sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atp_repro import provenance


def test_track_run_writes_a_complete_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "tables" / "x.csv"
    with provenance.track_run(
        "x", config={"lr": 1e-4}, parameters={"n": 2}, seed=7, output_dir=tmp_path
    ) as run:
        out.write_text("a,b\n1,2\n")
        run.add_output(out)
        run.record(attention_backend="sdpa", dtype="bf16", threads=2)
    record = json.loads((tmp_path / "tables" / "x.provenance.json").read_text())
    assert record["status"] == "ok" and record["name"] == "x"
    assert record["run_id"].startswith("x-")
    assert (
        record["seed"] == 7
        and record["config"] == {"lr": 1e-4}
        and record["parameters"] == {"n": 2}
    )
    assert record["attention_backend"] == "sdpa" and record["dtype"] == "bf16"
    assert record["extra"] == {"threads": 2}
    assert record["wall_time_s"] >= 0 and record["started_at"] and record["finished_at"]
    assert record["packages"]["torch"] and record["packages"]["python"]
    assert record["device"]["device"] in ("cpu", "cuda")
    assert set(record["git"]) == {"commit", "branch", "dirty"}
    assert record["outputs"] == {str(out): provenance.file_sha256(out)}


def test_failed_run_is_recorded_and_the_error_propagates(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), provenance.track_run("y", output_dir=tmp_path):
        raise RuntimeError("boom")
    record = json.loads((tmp_path / "tables" / "y.provenance.json").read_text())
    assert record["status"] == "failed"


def test_run_ids_are_unique() -> None:
    assert provenance.new_run_id("a") != provenance.new_run_id("a")


def test_git_info_of_this_checkout(repo_root: Path) -> None:
    info = provenance.git_info(repo_root)
    if info["commit"] is not None:
        assert len(info["commit"]) == 40 and isinstance(info["dirty"], bool)


def test_git_info_outside_git(tmp_path: Path) -> None:
    assert provenance.git_info(tmp_path)["commit"] is None


def test_run_spanning_several_cells(tmp_path: Path) -> None:
    run = provenance.start_run("z", parameters={"a": 1}, output_dir=tmp_path)
    sidecar = run.finish()
    assert sidecar == tmp_path / "tables" / "z.provenance.json"
    assert json.loads(sidecar.read_text())["status"] == "ok"
    with pytest.raises(RuntimeError, match="start_run"):
        provenance.RunRecord(name="n", run_id="r").finish()


def test_cpuinfo_field_reads_the_first_entry_and_none_when_absent(tmp_path):
    from atp_repro.provenance import cpuinfo_field

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    assert cpuinfo_field("vendor_id", info) == "AuthenticAMD"
    assert cpuinfo_field("model name", info) == "AMD EPYC 7B13"
    assert cpuinfo_field("flags", info) is None
    assert cpuinfo_field("vendor_id", tmp_path / "missing") is None
