"""Pinned CPU numerics: in effect in the command line, its notebook kernels, and opt-out works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
import pytest

from atp_repro import numerics


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any numerics setting (as on a fresh shell), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV and k != numerics.MODE_ENV_VAR}
    env.update(extra)
    return env


def info(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atp_repro", "info"], env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_command_line_pins_its_own_torch_by_default():
    out = info(clean_env())
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)["device"]["numerics"]
    assert state["mode"] == "pinned" and state["in_effect"] is _mkl_pinned(state)
    assert state["cpu_capability"] == numerics.PINNED_CAPABILITY
    assert state["env"] == numerics.PINNED_ENV


def test_native_mode_opts_out():
    out = info(clean_env(ATP_REPRO_NUMERICS="native"))
    state = json.loads(out.stdout)["device"]["numerics"]
    assert state["mode"] == "native" and state["in_effect"] is False
    assert state["env"]["ATEN_CPU_CAPABILITY"] is None


def test_a_bad_mode_is_refused_before_any_work():
    out = info(clean_env(ATP_REPRO_NUMERICS="fastest"))
    assert out.returncode == 2
    assert "ATP_REPRO_NUMERICS='fastest'" in out.stderr and "pinned" in out.stderr and "native" in out.stderr


def test_notebook_kernels_inherit_the_pinned_numerics(tmp_path):
    papermill = pytest.importorskip("papermill")
    from atp_repro.notebook_runner import KERNEL_NAME

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import json\nfrom atp_repro import numerics\nimport torch\nprint(json.dumps(numerics.state()))")]
    src, out = tmp_path / "probe.ipynb", tmp_path / "probe.out.ipynb"
    nbformat.write(nb, src)
    numerics.apply("pinned")  # what the command line does before it starts kernels
    papermill.execute_notebook(str(src), str(out), kernel_name=KERNEL_NAME, progress_bar=False)
    text = nbformat.read(out, as_version=4).cells[0].outputs[0]["text"]
    state = json.loads(text)
    assert state["in_effect"] is _mkl_pinned(state) and state["cpu_capability"] == "AVX2"


def test_pinning_changes_the_code_path_where_the_cpu_has_a_wider_one():
    import torch

    assert numerics.state()["cpu_capability"] == "AVX2"  # this test process (root conftest) is pinned
    native = info(clean_env(ATP_REPRO_NUMERICS="native"))
    capability = json.loads(native.stdout)["device"]["numerics"]["cpu_capability"]
    if capability == "AVX2":
        pytest.skip("this CPU has no wider path than AVX2: pinned and native coincide")
    assert capability != torch.backends.cpu.get_cpu_capability()


def test_makefile_exports_the_same_settings():
    from atp_repro import paths

    text = (paths.repo_root() / "Makefile").read_text()
    for key, value in numerics.PINNED_ENV.items():
        assert f"export {key} := {value}" in text


def _mkl_pinned(state: dict) -> bool:
    """MKL honours MKL_CBWR=AVX2 on Intel CPUs only; elsewhere the pin cannot hold (and says so)."""
    return state.get("mkl", {"branch": "AVX2"})["branch"] == "AVX2"


def _cpu_vendor() -> str:
    from atp_repro.provenance import cpuinfo_field

    return cpuinfo_field("vendor_id") or "unknown"


def test_mkl_runs_the_avx2_branch_in_strict_mode_on_intel_cpus_and_says_so_elsewhere():
    mkl = numerics.mkl_branch()
    if mkl is None:
        pytest.skip("this torch build carries no MKL whose branch can be read")
    state = numerics.state()
    if _cpu_vendor() == "GenuineIntel":
        assert mkl == {**mkl, "branch": "AVX2", "strict": True}
        assert state["in_effect"] is True and numerics.cache_key() == "pinned-avx2"
        assert numerics.mkl_not_honoured(state) is None
    else:  # MKL's documented behaviour on other vendors: the AUTO branch
        assert state["in_effect"] is False and "MKL runs its" in numerics.mkl_not_honoured(state)


def test_a_pinned_process_whose_mkl_ignores_the_pin_is_not_pinned_and_keys_its_artifacts_apart(monkeypatch):
    monkeypatch.setattr(numerics, "mkl_branch", lambda: {"branch": "AUTO", "strict": True, "auto": "AVX2"})
    state = numerics.state()
    assert state["in_effect"] is False and state["mkl"]["branch"] == "AUTO"
    assert numerics.cache_key() == "pinned-avx2-mkl-auto"
    warning = numerics.mkl_not_honoured(state)
    assert "AUTO branch" in warning and "Intel CPUs only" in warning
    monkeypatch.setattr(numerics, "mkl_branch", lambda: {"branch": "AVX2", "strict": True, "auto": "AVX512_E1"})
    assert numerics.state()["in_effect"] is True and numerics.cache_key() == "pinned-avx2"
