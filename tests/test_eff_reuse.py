"""Stored timing measurements: reused on the same machine, config and code; measured again otherwise."""

from __future__ import annotations

import pandas as pd
import pytest

from atp_repro.efficiency import reuse


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATP_REPRO_CACHE", str(tmp_path))
    return tmp_path


def counting(value):
    calls = []

    def measure():
        calls.append(1)
        return pd.DataFrame({"round": [0, 1], "seconds": [value, value + len(calls)]})

    return measure, calls


def test_a_second_call_reuses_the_stored_result(cache):
    measure, calls = counting(1.5)
    first = reuse.measured("bench", {"repeats": 3}, measure)
    second = reuse.measured("bench", {"repeats": 3}, measure)
    assert (first.status, second.status) == ("measured", "reused")
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first.result, second.result)
    assert second.measured_at == first.measured_at and first.measured_at
    assert "reused from" in reuse.describe(second) and "remeasure=True" in reuse.describe(second)
    assert "measured in this run" in reuse.describe(first)


def test_another_config_or_remeasure_measures_again(cache):
    measure, calls = counting(2.0)
    reuse.measured("bench", {"repeats": 3}, measure)
    other = reuse.measured("bench", {"repeats": 5}, measure)
    assert other.status == "measured" and len(calls) == 2
    again = reuse.measured("bench", {"repeats": 3}, measure, remeasure=True)
    assert again.status == "measured" and len(calls) == 3
    assert float(again.result.seconds.iloc[1]) == 5.0  # the new measurement, not the stored one
    assert float(reuse.measured("bench", {"repeats": 3}, measure).result.seconds.iloc[1]) == 5.0  # and it replaced it


def test_the_key_holds_the_machine_and_the_measuring_code(cache, monkeypatch):
    spec = reuse.measurement_spec("bench", {"repeats": 3})
    assert spec["machine"]["torch"] and "processor" in spec["machine"] and "threads" in spec["machine"]
    assert spec["code"]["packages"] == ["efficiency", "atp", "baselines.py"] and len(spec["code"]["sha256"]) == 64
    assert {"transformers", "python", "numerics"} <= set(spec["machine"])
    mini = reuse.measurement_spec("bench", {"repeats": 3}, code=("mini", "atp"))["code"]
    assert mini["packages"] == ["mini", "atp"] and mini["sha256"] != spec["code"]["sha256"]
    measure, calls = counting(1.0)
    reuse.measured("bench", {"repeats": 3}, measure)
    monkeypatch.setattr(reuse, "code_hash", lambda packages: "0" * 64)  # the timing code changed
    assert reuse.measured("bench", {"repeats": 3}, measure).status == "measured"
    monkeypatch.setattr(reuse, "machine_key", lambda: {"processor": "another CPU"})
    assert reuse.measured("bench", {"repeats": 3}, measure).status == "measured"
    assert len(calls) == 3


def test_a_failed_measurement_stores_nothing(cache):
    def broken():
        raise RuntimeError("the benchmark failed")

    with pytest.raises(RuntimeError, match="the benchmark failed"):
        reuse.measured("bench", {"repeats": 3}, broken)
    measure, calls = counting(1.0)
    assert reuse.measured("bench", {"repeats": 3}, measure).status == "measured" and len(calls) == 1


def test_bad_arguments_are_rejected_naming_them(cache):
    with pytest.raises(ValueError, match="remeasure must be True or False"):
        reuse.measured("bench", {}, lambda: 1, remeasure="yes")
    with pytest.raises(ValueError, match="threads must be an int >= 1 or None"):
        reuse.measured("bench", {}, lambda: 1, threads=0)
    with pytest.raises(ValueError, match="code: 'no_such_part' is not a subpackage or module of atp_repro"):
        reuse.measured("bench", {}, lambda: 1, code=("no_such_part",))


def test_threads_are_set_before_the_key_is_made(cache):
    import torch

    before = torch.get_num_threads()
    try:
        seen = []
        m = reuse.measured("bench", {}, lambda: seen.append(torch.get_num_threads()) or 1, threads=1)
        assert seen == [1] and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert reuse.measured("bench", {}, lambda: 2, threads=1).status == "reused"  # the same key as above
        assert reuse.provenance(m)[m.folder.name]["status"] == "measured"
    finally:
        torch.set_num_threads(before)
