"""atp-repro verify: the manifest of reproducible results catches a changed number, not a timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from atp_repro import verify
from atp_repro.cli import main

LONG = """row,column,unit,scale,paper,this_run,delta,match
"Trainable LM, 144 tokens",Token,tokens,mini,144,150.25,6.25,false
"Trainable LM, 144 tokens",Training Wall-time,s,mini,13089,74.2,,
"""
WIDE = "run,tokens,avg_rate,train_wall_time_s\ntrainable_144,37.5,0.9612,71.3\n"
CLAIMS = """claim,holds,verdict,evidence
The 144 goal keeps more tokens than the 88 goal,true,holds,150 vs 90
Frozen-LM training is cheaper than trainable-LM training (wall-time),true,holds,52 s vs 65 s
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "t4.csv").write_text(LONG)
    (tables / "t6.csv").write_text(WIDE)
    (tables / "t4.claims.csv").write_text(CLAIMS)
    (tables / "supp_table3_flash_attention_timing.runs.csv").write_text("run,seconds\na,1.0\n")
    verify.write_manifest(tmp_path)
    return tmp_path


def test_unchanged_results_verify(root):
    assert verify.verify(root) == []
    assert main(["verify", "--root", str(root)]) == 0


def test_timings_may_change(root):
    t = root / "tables"
    (t / "t4.csv").write_text(LONG.replace("74.2", "99.9"))
    (t / "t6.csv").write_text(WIDE.replace("71.3", "12.0"))
    (t / "t4.claims.csv").write_text(CLAIMS.replace("52 s vs 65 s", "80 s vs 65 s").replace(
        "wall-time),true,holds", "wall-time),false,does not hold"))
    (t / "supp_table3_flash_attention_timing.runs.csv").write_text("run,seconds\na,2.0\n")
    assert verify.verify(root) == []


def test_a_changed_number_is_reported_with_both_values(root, capsys):
    (root / "tables" / "t4.csv").write_text(LONG.replace("150.25", "150.26"))
    flipped = CLAIMS.replace("true,holds,150 vs 90", "false,does not hold,150 vs 90")
    (root / "tables" / "t4.claims.csv").write_text(flipped)
    found = verify.verify(root)
    text = "\n".join(map(str, found))
    assert "t4.csv" in text and "'150.25'" in text and "'150.26'" in text and "Token" in text
    assert "t4.claims.csv" in text and "does not hold" in text
    assert main(["verify", "--root", str(root)]) == 1
    assert "150.26" in capsys.readouterr().out


def test_missing_and_unlisted_files_are_reported(root):
    (root / "tables" / "t6.csv").unlink()
    (root / "tables" / "new.csv").write_text("a\n1\n")
    found = {(d.file, d.now) for d in verify.verify(root)}
    assert ("tables/t6.csv", "missing") in found and ("tables/new.csv", "present") in found


def test_without_a_manifest_verify_says_how_to_make_one(tmp_path):
    (tmp_path / "tables").mkdir()
    with pytest.raises(FileNotFoundError, match="verify --update"):
        verify.verify(tmp_path)


def _sidecar(root: Path, name: str, weights: str) -> None:
    import json

    record = {"name": name, "artifacts": {"upper_bound-abc": {"model.pt": weights}}}
    (root / "tables" / f"{name}.provenance.json").write_text(json.dumps(record))


def test_other_weights_under_the_same_artifact_name_are_reported_before_the_cells(root):
    _sidecar(root, "t4", "a" * 64)
    verify.write_manifest(root)
    assert verify.verify(root) == []
    _sidecar(root, "t4", "b" * 64)  # retrained: same key, other weights
    (root / "tables" / "t4.csv").write_text(LONG.replace("150.25", "150.26"))
    found = verify.verify(root)
    assert found[0].where == "weights of upper_bound-abc"
    assert "aaaaaaaaaaaa" in str(found[0].committed) and "bbbbbbbbbbbb" in str(found[0].now)
    assert any("150.26" in str(d) for d in found[1:])


def test_tables_from_different_weights_under_one_name_are_named_and_not_committed(root):
    _sidecar(root, "t4", "a" * 64)
    _sidecar(root, "t6", "b" * 64)
    found = [d for d in verify.verify(root) if d.where == "weights of upper_bound-abc"]
    assert len(found) == 1 and "t4.provenance.json" in str(found[0].committed) and found[0].file.endswith(
        "t6.provenance.json")
    with pytest.raises(ValueError, match="upper_bound-abc"):
        verify.write_manifest(root)


def test_the_cache_names_each_artifact_it_serves_in_the_provenance(tmp_path):
    import torch

    from atp_repro import provenance
    from atp_repro.mini.cache import load_or_build

    def build(folder: Path) -> None:
        torch.save({"w": torch.ones(2)}, folder / "model.pt")
        (folder / "notes.txt").write_text("not weights")

    folder, manifest, _ = load_or_build("tiny", {"k": 2}, build, root=tmp_path)
    used = provenance.artifacts_used()[folder.name]
    assert used == {"model.pt": manifest["files"]["model.pt"]}
    record = provenance.start_run("t", sidecar=tmp_path / "t.provenance.json")
    assert record.to_dict()["artifacts"][folder.name] == used


def test_a_run_whose_mkl_ignored_the_pin_is_reported_as_another_numerics_mode(root):
    import json

    pinned = {"mode": "pinned", "in_effect": True, "cpu_capability": "AVX2", "mkl": {"branch": "AVX2"}}
    (root / "tables" / "t4.provenance.json").write_text(json.dumps({"device": {"numerics": pinned}}))
    verify.write_manifest(root)
    assert verify.verify(root) == []
    amd = {**pinned, "in_effect": False, "mkl": {"branch": "AUTO"}}
    (root / "tables" / "t4.provenance.json").write_text(json.dumps({"device": {"numerics": amd}}))
    found = verify.verify(root)
    assert found[0].where == "numerics mode" and found[0].committed == ["pinned"]
    assert "MKL branch AUTO" in found[0].now[0]
