"""Plots for the notebooks: one seaborn style, deterministic PNG files, shown inline.

Every function draws from numbers a notebook has already computed and returns the figure;
:func:`save_and_show` writes it to ``figures/<notebook>_<what>.png`` (atomically; no software
version or timestamp in the file, so identical data give identical bytes) and displays the same
PNG bytes in the notebook, whatever matplotlib backend is active.
"""

from __future__ import annotations

import io
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from atp_repro import paths

__all__ = [
    "DPI",
    "MIN_FONT_SIZE",
    "PNG_METADATA",
    "use_style",
    "figure_path",
    "png_bytes",
    "save_and_show",
    "save_pdf",
    "prefill_time_bars",
    "family_accuracy_bars",
    "tokens_vs_rate",
    "rate_vs_tokens_by_method",
    "accuracy_by_scene_size",
    "kept_token_distribution",
    "interval_rows",
    "lr_schedules",
    "pairwise_outcomes",
    "generation_bars",
    "scaling_lines",
]

DPI = 110
MIN_FONT_SIZE = 9
PNG_METADATA = {"Software": None}  # matplotlib writes its version here by default
PAPER_COLOR, RUN_COLOR = "#999999", "#1f77b4"


def use_style() -> None:
    """The one style of every figure: seaborn ``whitegrid``, colour-blind palette, fonts >= 9 pt."""
    sns.set_theme(style="whitegrid", palette="colorblind", context="notebook",
                  rc={"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
                      "ytick.labelsize": 9, "legend.fontsize": 9, "legend.title_fontsize": 9,
                      "figure.titlesize": 12, "svg.hashsalt": "atp-repro"})


def figure_path(notebook: str, what: str, output_dir: str | os.PathLike[str] | None = None) -> Path:
    """``figures/<notebook>_<what>.png`` (``<notebook>.png`` for an empty ``what``) under
    ``output_dir`` (the repository root when empty)."""
    stem = f"{notebook}_{what}" if what else notebook
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", stem):
        raise ValueError(f"notebook={notebook!r}, what={what!r}: use letters, digits, '_', '-', '.' only")
    return paths.figures_dir(output_dir) / f"{stem}.png"


def png_bytes(fig: Any, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes, tight around everything drawn (nothing cut off), without metadata."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1, metadata=PNG_METADATA)
    return buf.getvalue()


def save_and_show(fig: Any, notebook: str, what: str, output_dir: str | os.PathLike[str] | None = None,
                  *, show: bool = True) -> Path:
    """Write the figure to :func:`figure_path` and display it inline; closes the figure."""
    data = png_bytes(fig)
    path = paths.atomic_write_bytes(figure_path(notebook, what, output_dir), data)
    plt.close(fig)
    if show:
        from IPython.display import Image, display

        display(Image(data=data, format="png"))
    return path


def save_pdf(fig: Any, notebook: str, what: str = "", output_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the figure as ``figures/<notebook>[_<what>].pdf``, atomically and without dates or
    software versions (identical figures give identical bytes); the figure stays open."""
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf", bbox_inches="tight", metadata={"CreationDate": None, "Producer": None,
                                                                  "Creator": None})
    return paths.atomic_write_bytes(figure_path(notebook, what, output_dir).with_suffix(".pdf"), buf.getvalue())


def _annotate_bars(ax: Any, texts: Sequence[str]) -> None:
    for patch, text in zip(ax.patches, texts):
        if text:
            ax.annotate(text, (patch.get_x() + patch.get_width() / 2, patch.get_height()), ha="center",
                        va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")


def prefill_time_bars(comparison: pd.DataFrame, time_column: str = "CUDA Time (ms)",
                      delta_column: str = "Δ") -> Any:
    """Supplementary Table 3: prefill time per strategy, the paper's (A100) and this run's, Δ on top.

    ``comparison`` is the long frame of :func:`atp_repro.paper.compare_with_paper`.
    """
    use_style()
    cell = comparison.set_index(["row", "column"])
    rows = list(dict.fromkeys(comparison.loc[comparison.column == time_column, "row"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, side, title, color in ((axes[0], "paper", "paper (A100, CUDA ms)", PAPER_COLOR),
                                   (axes[1], "this_run", "this run (ms on this machine)", RUN_COLOR)):
        values = [cell.loc[(r, time_column), side] for r in rows]
        values = [float(v) if isinstance(v, (int, float)) and not math.isnan(v) else 0.0 for v in values]
        ax.bar(range(len(rows)), values, color=color)
        deltas = []
        for r in rows:
            d = cell.loc[(r, delta_column), side] if (r, delta_column) in cell.index else None
            deltas.append(f"Δ {float(d):.1f}%" if isinstance(d, (int, float)) and not math.isnan(d) else "")
        _annotate_bars(ax, deltas)
        ax.set_xticks(range(len(rows)), ["\n".join(textwrap.wrap(r, 12)) for r in rows], fontsize=9)
        ax.set_title(title)
        ax.set_ylabel("prefill time (ms)")
        ax.margins(y=0.12)
    fig.suptitle("Prefill time per strategy (Δ: reduction against U.B. w/o flash attn)")
    fig.tight_layout()
    return fig


def family_accuracy_bars(per_family: pd.DataFrame, models: Sequence[str], title: str) -> Any:
    """Accuracy per question family of several models (columns of ``per_family``), chance as ticks.

    ``per_family``: index = family, a ``chance`` column and one accuracy column (0-1) per model.
    """
    use_style()
    long = per_family[list(models)].rename_axis("family").reset_index().melt(
        id_vars="family", var_name="model", value_name="accuracy")
    long["accuracy"] *= 100
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(per_family)), 4.2))
    sns.barplot(data=long, x="family", y="accuracy", hue="model", ax=ax)
    if "chance" in per_family.columns:
        for i, c in enumerate(per_family["chance"]):
            ax.hlines(100 * c, i - 0.42, i + 0.42, colors="black", linestyles="dashed", linewidth=1.2,
                      label="image-blind chance" if i == 0 else None)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def tokens_vs_rate(run: pd.DataFrame, paper_points: pd.DataFrame, title: str, caption: str = "") -> Any:
    """Tokens against Avg. Rate: this run's rows (with 95% intervals) and the paper's points.

    ``run``: columns ``label, tokens, rate, low, high``; ``paper_points``: ``label, tokens, rate``
    (tokens as 576-equivalents, rates in percent). ``caption``: a line under the plot (e.g. what
    short labels stand for).
    """
    use_style()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.errorbar(run["tokens"], run["rate"], yerr=[run["rate"] - run["low"], run["high"] - run["rate"]],
                fmt="o", color=RUN_COLOR, capsize=4, label="this run (95% interval)")
    ax.scatter(paper_points["tokens"], paper_points["rate"], marker="s", color=PAPER_COLOR, label="paper", zorder=3)
    for frame, color in ((run, RUN_COLOR), (paper_points, "#555555")):
        for r in frame.itertuples(index=False):
            ax.annotate(r.label, (r.tokens, r.rate), xytext=(5, 4), textcoords="offset points", fontsize=9,
                        color=color)
    ax.set_xlabel("vision tokens (576-equivalent)")
    ax.set_ylabel("Avg. Rate (% of the upper bound)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.margins(x=0.15, y=0.1)
    if caption:
        ax.annotate(caption, xy=(0, -0.14), xycoords="axes fraction", va="top", fontsize=9)
    fig.tight_layout()
    return fig


def rate_vs_tokens_by_method(points: pd.DataFrame, title: str, paper_points: pd.DataFrame | None = None) -> Any:
    """Avg. Rate against average vision tokens, one line per method (a Pareto view across budgets).

    ``points``: columns ``method, tokens, rate, low, high`` (tokens as 576-equivalents, rates and the
    95% interval in percent) and optionally ``flops`` (prefill FLOPs in % of the upper bound), drawn
    as a second panel; ``paper_points`` (optional): ``label, tokens, rate`` drawn as grey squares.
    """
    use_style()
    panels = [("tokens", "vision tokens, average over decoder layers (576-equivalent)")]
    if "flops" in points.columns:
        panels.append(("flops", "prefill FLOPs (% of the upper bound's)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels) * 0.75 + 2, 4.8), squeeze=False)
    data = points.sort_values(["method", "tokens"])
    methods = list(data["method"].unique())
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    for ax, (x, xlabel) in zip(axes[0], panels):
        sns.lineplot(data=data, x=x, y="rate", hue="method", style="method", markers=True, dashes=False,
                     palette=palette, ax=ax, errorbar=None, legend=ax is axes[0][-1])
        for method, group in data.groupby("method", sort=False):
            ax.errorbar(group[x], group["rate"], yerr=[group["rate"] - group["low"], group["high"] - group["rate"]],
                        fmt="none", ecolor=palette[method], capsize=3, alpha=0.8)
        if x == "tokens" and paper_points is not None and len(paper_points):
            ax.scatter(paper_points["tokens"], paper_points["rate"], marker="s", color=PAPER_COLOR, label="paper",
                       zorder=3)
            for r in paper_points.itertuples(index=False):
                ax.annotate(r.label, (r.tokens, r.rate), xytext=(5, -10), textcoords="offset points", fontsize=9,
                            color="#555555")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Avg. Rate (% of the upper bound)")
    handles, labels = [], []
    for ax in axes[0]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    axes[0][-1].legend(handles, labels, loc="lower right", title="method (95% interval)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_by_scene_size(by_objects: pd.DataFrame, models: Mapping[str, str], title: str) -> Any:
    """Accuracy by number of objects in the scene, one panel per family, chance dashed.

    ``by_objects``: columns ``family, objects, chance`` and the accuracy columns named in ``models``
    (column -> legend label), accuracies 0-1.
    """
    use_style()
    families = list(dict.fromkeys(by_objects["family"]))
    ncols = min(3, len(families))
    nrows = math.ceil(len(families) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), sharey=True, squeeze=False)
    for ax, fam in zip(axes.flat, families):
        cell = by_objects[by_objects["family"] == fam]
        x = np.arange(len(cell))
        for col, label in models.items():
            ax.plot(x, 100 * cell[col], marker="o", label=label)
        ax.plot(x, 100 * cell["chance"], color="black", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(x, cell["objects"].astype(str))
        ax.set_title(fam)
        ax.set_xlabel("objects in the scene")
        ax.set_ylim(0, 105)
    for ax in axes.flat[len(families):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def kept_token_distribution(tokens: Mapping[str, Sequence[float]], title: str, xlabel: str) -> Any:
    """Histogram of kept vision tokens per test question, one colour per run."""
    use_style()
    long = pd.concat([pd.DataFrame({"tokens": np.asarray(v, dtype=float), "run": k}) for k, v in tokens.items()],
                     ignore_index=True)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.histplot(data=long, x="tokens", hue="run", element="step", stat="percent", common_norm=False,
                 bins=40, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test questions (%)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def interval_rows(rows: pd.DataFrame, title: str, xlabel: str, *, reference: float | None = None) -> Any:
    """One row per setting: a value with its 95% interval (columns ``label, value, low, high``,
    optionally ``group`` for colours)."""
    use_style()
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.6))
    y = np.arange(len(rows))[::-1]
    groups = list(dict.fromkeys(rows["group"])) if "group" in rows.columns else [None]
    colors = dict(zip(groups, sns.color_palette("colorblind", len(groups))))
    for yi, r in zip(y, rows.itertuples(index=False)):
        group = getattr(r, "group", None)
        ax.errorbar(r.value, yi, xerr=[[r.value - r.low], [r.high - r.value]], fmt="o", capsize=4,
                    color=colors[group], label=group)
    if reference is not None:
        ax.axvline(reference, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, rows["label"])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if groups != [None]:
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), loc="best")
    fig.tight_layout()
    return fig


def lr_schedules(schedules: Mapping[str, Mapping[str, float]], warmup_ratio: Mapping[str, float],
                 title: str) -> Any:
    """Learning rate over one epoch (linear warm-up, cosine decay) per config and parameter group.

    ``schedules``: config label -> {group label: peak learning rate}; ``warmup_ratio``: per config.
    """
    from atp_repro.mini.train import cosine_with_warmup

    use_style()
    fig, axes = plt.subplots(1, len(schedules), figsize=(5.2 * len(schedules), 3.8), squeeze=False)
    total = 1000
    for ax, (name, peaks) in zip(axes.flat, schedules.items()):
        warm = int(round(warmup_ratio[name] * total))
        x = np.arange(total) / total
        for group, peak in peaks.items():
            ax.plot(x, [peak * cosine_with_warmup(s, total, warm) for s in range(total)], label=f"{group} ({peak:g})")
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(peaks.values()) / 100)
        ax.set_xlabel("fraction of the epoch")
        ax.set_ylabel("learning rate")
        ax.set_title(name)
        ax.legend(loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def pairwise_outcomes(tallies: pd.DataFrame, paper: Mapping[str, float], title: str,
                      systems: tuple[str, str] = ("judged system", "other")) -> Any:
    """Left: each judge's shares of wins / ties / losses of the judged system (columns ``judge, wins,
    ties, losses``; rows without counts, such as an average, are left out). Right: win rates with their
    95% intervals (``win_rate, ci_low, ci_high``, fractions) beside the paper's (``paper``: label ->
    percent), and the 50% line of "as good as". ``systems``: the names of the judged system and the other."""
    use_style()
    counted = tallies.dropna(subset=["wins"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.5 * max(len(tallies) + len(paper), 3) + 1.8),
                                   gridspec_kw={"width_ratios": [1.2, 1]})
    colors = dict(zip(("wins", "ties", "losses"), sns.color_palette("colorblind", 3)))
    y = np.arange(len(counted))[::-1]
    left = np.zeros(len(counted))
    for col, label in (("wins", f"{systems[0]} better"), ("ties", "tie"), ("losses", f"{systems[1]} better")):
        share = counted[col].to_numpy(float) / counted["n"].to_numpy(float)
        ax1.barh(y, 100 * share, left=100 * left, color=colors[col], label=label)
        left += share
    ax1.set_yticks(y, counted["judge"])
    ax1.set_xlim(0, 100)
    ax1.set_xlabel("% of judged items")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, frameon=False)
    rows = [(f"{r.judge} (this run)", 100 * r.win_rate, 100 * r.ci_low, 100 * r.ci_high)
            for r in tallies.itertuples(index=False)] + [(f"{k} (paper)", v, v, v) for k, v in paper.items()]
    y2 = np.arange(len(rows))[::-1]
    for yi, (label, v, lo, hi) in zip(y2, rows):
        paper_row = label.endswith("(paper)")
        ax2.errorbar(v, yi, xerr=None if paper_row or math.isnan(lo) else [[v - lo], [hi - v]],
                     fmt="s" if paper_row else "o", capsize=4, color=PAPER_COLOR if paper_row else RUN_COLOR)
    ax2.axvline(50, color="black", linestyle="--", linewidth=1)
    ax2.set_yticks(y2, [r[0] for r in rows])
    ax2.set_xlabel(f"win % of {systems[0]} (ties count half)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def generation_bars(runs: pd.DataFrame, title: str) -> Any:
    """Time to first token and decode time per new token, by strategy and batch size (medians, quartile bars)."""
    use_style()
    long = pd.concat([
        runs.assign(phase="time to first token (ms)", ms=1e3 * runs.ttft_s),
        runs.assign(phase="decode, per new token (ms)", ms=1e3 * runs.decode_s / (runs.new_tokens - 1)),
    ], ignore_index=True)
    long["setting"] = "batch " + long.batch.astype(str)
    grid = sns.catplot(data=long, kind="bar", x="setting", y="ms", hue="strategy", col="phase", sharey=False,
                       estimator="median", errorbar=("pi", 50), height=3.6, aspect=1.2)
    grid.set_axis_labels("", "ms (median, quartile bars)")
    grid.set_titles("{col_name}")
    grid.figure.suptitle(title, y=1.03)
    return grid.figure


def scaling_lines(metrics: pd.DataFrame, title: str, *, target: float) -> Any:
    """Against the vision-token count: measured / FLOPs-predicted prefill reduction of both ATP strategies
    (left), and t(paper's strategy) / t(fast kernel everywhere) with its quartiles (right)."""
    use_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    long = pd.concat([metrics.assign(strategy=s, ratio=metrics[f"{s}_measured_over_predicted"])
                      for s in ("atp_fast", "atp_paper")], ignore_index=True)
    sns.lineplot(data=long, x="vision_tokens", y="ratio", hue="strategy", marker="o", ax=left)
    left.axhline(target, color="black", linestyle="--", linewidth=1)
    left.set_xlabel("vision tokens (upper bound)")
    left.set_ylabel("measured / FLOPs-predicted reduction")
    left.set_xticks(metrics.vision_tokens)
    right.errorbar(metrics.vision_tokens, metrics.paper_over_fast,
                   yerr=[metrics.paper_over_fast - metrics.paper_over_fast_q1,
                         metrics.paper_over_fast_q3 - metrics.paper_over_fast], fmt="o-", capsize=4)
    right.axhline(1.0, color="black", linestyle="--", linewidth=1)
    right.set_xlabel("vision tokens (upper bound)")
    right.set_ylabel("t(atp_paper) / t(atp_fast)")
    right.set_xticks(metrics.vision_tokens)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
