"""Tallies of pairwise judgements: win rates with uncertainty, and agreement between judges.

Rule (the paper's "win %"): the judged system's win rate over the other is
``(wins + ties / 2) / judged items`` — a tie counts as half a win, so 50% means "as good". Each
judge's latest judgement of an item counts (see :mod:`atp_repro.pairwise.records`).

Uncertainty: percentile bootstrap over items (``scipy.stats.bootstrap``); the human average
resamples the items all its judges judged, jointly (paired), so it reflects the shared items.
Agreement, on the outcomes win / tie / loss of the judged system: percent agreement and Cohen's
kappa per pair of judges (``statsmodels``), Fleiss' kappa (``statsmodels``) and Krippendorff's alpha
(``krippendorff``, nominal; it allows items some judges skipped) over all of them. A kappa is
undefined (NaN) when chance agreement is 1, i.e. every judgement falls in one and the same category.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .records import JUDGEMENTS_DIR, JudgementError, latest, read_judgements
from .sample import PairwiseSample, load_sample

__all__ = [
    "OUTCOMES",
    "outcomes",
    "win_rate",
    "tally",
    "mean_win_rate",
    "cohen_kappa",
    "fleiss_kappa",
    "krippendorff_alpha",
    "agreement",
    "read_folder",
    "tally_folder",
    "tally_judges",
]

OUTCOMES = ("win", "tie", "loss")
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
LEVEL = 0.95
N_RESAMPLES = 10_000


def outcomes(judgements, sample: PairwiseSample) -> pd.Series:
    """Per item, the judged system's (``sample.systems[0]``) outcome: "win", "tie" or "loss"."""
    system = sample.systems[0]
    out = {}
    for item_id, j in latest(judgements).items():
        side = sample.item(item_id).side(j.choice)
        out[item_id] = "tie" if side is None else "win" if side == system else "loss"
    return pd.Series(out, dtype=object, name="outcome")


def _check_outcomes(o: pd.Series, name: str = "outcomes") -> None:
    bad = sorted(set(o) - set(OUTCOMES))
    if bad:
        raise ValueError(f"{name}: values must be in {OUTCOMES}, got {bad}")


def win_rate(o: pd.Series) -> float:
    """(wins + ties / 2) / n; NaN for no judgements."""
    _check_outcomes(o)
    return float(o.map(SCORE).mean()) if len(o) else float("nan")


def _bootstrap(data: tuple[np.ndarray, ...], statistic, level: float, n_resamples: int,
               seed: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if len(data[0]) < 2:
        return float("nan"), float("nan")
    res = bootstrap(data, statistic, paired=len(data) > 1, vectorized=False, confidence_level=level,
                    n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def tally(o: pd.Series, *, level: float = LEVEL, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """Counts, win rate and its bootstrap interval over items."""
    _check_outcomes(o)
    counts = o.value_counts()
    low, high = _bootstrap((o.map(SCORE).to_numpy(float),), np.mean, level, n_resamples, seed)
    return {"n": len(o), "wins": int(counts.get("win", 0)), "ties": int(counts.get("tie", 0)),
            "losses": int(counts.get("loss", 0)), "win_rate": win_rate(o), "ci_low": low, "ci_high": high}


def mean_win_rate(by_judge: Mapping[str, pd.Series], *, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
                  seed: int = 0) -> dict[str, float]:
    """The average of the judges' win rates (each on all its items), with a paired bootstrap interval over
    the items every judge judged."""
    if not by_judge:
        raise ValueError("by_judge: no judges")
    common = sorted(set.intersection(*(set(o.index) for o in by_judge.values())))
    value = float(np.mean([win_rate(o) for o in by_judge.values()]))
    scores = tuple(o.loc[common].map(SCORE).to_numpy(float) for o in by_judge.values())
    low, high = _bootstrap(scores, lambda *s: np.mean([x.mean() for x in s]), level, n_resamples, seed)
    return {"judges": len(by_judge), "n_common": len(common), "win_rate": value, "ci_low": low, "ci_high": high}


def _codes(o: pd.Series) -> np.ndarray:
    return o.map({c: k for k, c in enumerate(OUTCOMES)}).to_numpy(int)


def cohen_kappa(a: pd.Series, b: pd.Series) -> float:
    """Cohen's kappa of two judges on the items both judged; NaN when undefined (chance agreement 1)."""
    from statsmodels.stats.inter_rater import cohens_kappa

    common = a.index.intersection(b.index)
    if len(common) == 0:
        return float("nan")
    table = np.zeros((len(OUTCOMES), len(OUTCOMES)))
    np.add.at(table, (_codes(a.loc[common]), _codes(b.loc[common])), 1)
    p = table / table.sum()
    if np.isclose((p.sum(axis=1) * p.sum(axis=0)).sum(), 1.0):
        return float("nan")
    return float(cohens_kappa(table, return_results=False))


def _matrix(by_judge: Mapping[str, pd.Series]) -> pd.DataFrame:
    """items x judges, outcome codes, NaN where a judge did not judge the item."""
    return pd.DataFrame({k: pd.Series(_codes(o), index=o.index, dtype=float) for k, o in by_judge.items()})


def fleiss_kappa(by_judge: Mapping[str, pd.Series]) -> float:
    """Fleiss' kappa over the items every judge judged; NaN when undefined."""
    from statsmodels.stats.inter_rater import aggregate_raters
    from statsmodels.stats.inter_rater import fleiss_kappa as fk

    m = _matrix(by_judge).dropna()
    if len(by_judge) < 2 or m.empty:
        return float("nan")
    counts, _ = aggregate_raters(m.to_numpy(int), n_cat=len(OUTCOMES))
    share = counts.sum(axis=0) / counts.sum()
    if np.isclose((share**2).sum(), 1.0):
        return float("nan")
    return float(fk(counts, method="fleiss"))


def krippendorff_alpha(by_judge: Mapping[str, pd.Series]) -> float:
    """Krippendorff's alpha (nominal) over all items, missing judgements allowed; NaN when undefined."""
    import krippendorff

    m = _matrix(by_judge)
    values = m.to_numpy().ravel()
    values = values[~np.isnan(values)]
    if len(by_judge) < 2 or len(np.unique(values)) < 2:
        return float("nan")
    return float(krippendorff.alpha(reliability_data=m.to_numpy().T, level_of_measurement="nominal",
                                    value_domain=list(range(len(OUTCOMES)))))


def agreement(by_judge: Mapping[str, pd.Series]) -> pd.DataFrame:
    """One row per pair of judges (items both judged, percent agreement, Cohen's kappa) and one row for
    all judges together (Fleiss' kappa over the items all judged, Krippendorff's alpha over all)."""
    rows = []
    for (ka, a), (kb, b) in itertools.combinations(by_judge.items(), 2):
        common = a.index.intersection(b.index)
        same = float((a.loc[common] == b.loc[common]).mean()) if len(common) else float("nan")
        rows.append({"judges": f"{ka} / {kb}", "items": len(common), "agreement": same,
                     "cohen_kappa": cohen_kappa(a, b), "fleiss_kappa": float("nan"),
                     "krippendorff_alpha": float("nan")})
    if len(by_judge) >= 2:
        rows.append({"judges": "all: " + " / ".join(by_judge), "items": len(_matrix(by_judge).dropna()),
                     "agreement": float("nan"), "cohen_kappa": float("nan"), "fleiss_kappa": fleiss_kappa(by_judge),
                     "krippendorff_alpha": krippendorff_alpha(by_judge)})
    return pd.DataFrame(rows, columns=["judges", "items", "agreement", "cohen_kappa", "fleiss_kappa",
                                       "krippendorff_alpha"])


def read_folder(folder: str | os.PathLike[str]) -> tuple[PairwiseSample, dict[str, tuple[str, pd.Series]]]:
    """The sample of ``folder`` and every judge's (kind, outcomes) from ``judgements/*.jsonl``
    (validated line by line; an empty file counts as a judge with no judgements)."""
    folder = Path(folder)
    sample = load_sample(folder)
    judges = {}
    for path in sorted((folder / JUDGEMENTS_DIR).glob("*.jsonl")):
        js = read_judgements(path, sample)
        kinds = {j.kind for j in js}
        if len(kinds) > 1:
            raise JudgementError(f"{path}: mixes judgement kinds {sorted(kinds)}; one file is one judge")
        judges[path.stem] = (kinds.pop() if kinds else "human", outcomes(js, sample))
    return sample, judges


def tally_folder(folder: str | os.PathLike[str], *, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
                 seed: int = 0) -> pd.DataFrame:
    """:func:`tally_judges` of every judge file of ``folder``."""
    return tally_judges(read_folder(folder)[1], level=level, n_resamples=n_resamples, seed=seed)


def tally_judges(judges: Mapping[str, tuple[str, pd.Series]], *, level: float = LEVEL,
                 n_resamples: int = N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per judge (kind, counts, win rate, interval) of ``judges`` (judge -> (kind, outcomes), as
    :func:`read_folder` gives them) and, with any human judgements, the human average."""
    rows = [{"judge": k, "kind": kind, **tally(o, level=level, n_resamples=n_resamples, seed=seed)}
            for k, (kind, o) in judges.items()]
    humans = {k: o for k, (kind, o) in judges.items() if kind == "human" and len(o)}
    if humans:
        avg = mean_win_rate(humans, level=level, n_resamples=n_resamples, seed=seed)
        rows.append({"judge": "Human (average)", "kind": "human", "n": avg["n_common"], "wins": None, "ties": None,
                     "losses": None, "win_rate": avg["win_rate"], "ci_low": avg["ci_low"], "ci_high": avg["ci_high"]})
    return pd.DataFrame(rows, columns=["judge", "kind", "n", "wins", "ties", "losses", "win_rate", "ci_low", "ci_high"])
