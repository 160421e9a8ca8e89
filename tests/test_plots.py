"""Plot helpers: deterministic PNG bytes, the file layout, readable fonts."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from atp_repro import plots


def _figure():
    rows = pd.DataFrame({"label": ["a", "b"], "group": ["g", "h"], "value": [80.0, 70.0], "low": [78.0, 66.0],
                         "high": [82.0, 73.0]})
    return plots.interval_rows(rows, "title", "Avg. Rate (%)")


def test_png_bytes_are_deterministic_and_carry_no_version() -> None:
    first, second = plots.png_bytes(_figure()), plots.png_bytes(_figure())
    plt.close("all")
    assert first == second and first.startswith(b"\x89PNG")
    assert b"matplotlib" not in first.lower() and b"Software" not in first


def test_save_and_show_writes_the_named_figure(tmp_path: Path) -> None:
    path = plots.save_and_show(_figure(), "nb", "what", tmp_path, show=False)
    assert path == tmp_path / "figures" / "nb_what.png" and path.read_bytes().startswith(b"\x89PNG")
    assert plots.figure_path("nb", "", tmp_path).name == "nb.png"
    with pytest.raises(ValueError, match="letters"):
        plots.figure_path("nb", "../x", tmp_path)


def test_style_fonts_are_readable() -> None:
    plots.use_style()
    for key in ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize", "legend.fontsize"):
        assert plt.rcParams[key] >= plots.MIN_FONT_SIZE, key


def test_every_plot_draws_from_small_frames() -> None:
    per_family = pd.DataFrame({"chance": [0.5, 0.2], "ub": [0.9, 0.8], "atp": [0.8, 0.6]}, index=["x", "y"])
    comparison = pd.DataFrame({"row": ["U", "U", "A", "A"], "column": ["T (ms)", "Δ"] * 2,
                               "paper": [10.0, None, 6.0, 40.0], "this_run": [20.0, None, 8.0, 60.0]})
    by_objects = pd.DataFrame({"family": ["x", "x", "y"], "objects": ["1", "2-3", "1"], "chance": [0.5, 0.5, 0.2],
                               "ub": [1.0, 0.9, 0.8], "atp": [0.9, 0.8, 0.7]})
    points = pd.DataFrame({"label": ["p"], "tokens": [144.0], "rate": [98.1], "low": [97.0], "high": [99.0]})
    figures = [
        plots.family_accuracy_bars(per_family, ["ub", "atp"], "t"),
        plots.prefill_time_bars(comparison, time_column="T (ms)"),
        plots.accuracy_by_scene_size(by_objects, {"ub": "U.B.", "atp": "ATP"}, "t"),
        plots.tokens_vs_rate(points, points, "t"),
        plots.rate_vs_tokens_by_method(pd.DataFrame({"method": ["a", "a", "b"], "tokens": [80.0, 128.0, 80.0],
                                                     "rate": [60.0, 80.0, 55.0], "low": [58.0, 78.0, 53.0],
                                                     "high": [62.0, 82.0, 57.0]}), "t", points),
        plots.rate_vs_tokens_by_method(pd.DataFrame({"method": ["a", "b"], "tokens": [80.0, 80.0],
                                                     "flops": [30.0, 31.0], "rate": [60.0, 55.0],
                                                     "low": [58.0, 53.0], "high": [62.0, 57.0]}), "t"),
        plots.kept_token_distribution({"a": [1.0, 2.0, 2.5], "b": [3.0, 3.5]}, "t", "tokens"),
        plots.lr_schedules({"real": {"LLM": 2e-5, "ATP": 1e-4}}, {"real": 0.03}, "t"),
    ]
    for fig in figures:
        assert plots.png_bytes(fig).startswith(b"\x89PNG")
    plt.close("all")


def test_save_pdf_is_atomic_and_deterministic(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    first = plots.save_pdf(fig, "nb", "what", tmp_path).read_bytes()
    second = plots.save_pdf(fig, "nb", "what", tmp_path).read_bytes()
    assert first == second and first.startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["nb_what.pdf"]  # no temp files left
    plt.close(fig)
