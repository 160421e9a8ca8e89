"""Results over training seeds: means, spreads, and intervals that count two sources of noise.

A fine-tune is one draw: another seed (data order, ATP initialisation) trains a different model, and
another test set of the same size would score it differently. A verdict that ignores the first
source can flip on a rerun, so every mini-world claim is judged on an interval that combines both:

- **seeds**: the k fine-tunes of a run are evaluated on the *same* test questions; the spread of
  their k rates is training variation. Its half-width is Student's t quantile (k - 1 degrees of
  freedom; Welch-Satterthwaite for a difference of two runs) times the standard error of the mean.
- **test questions**: a paired bootstrap redraws question ids (within families) once per replicate
  and scores every seed of every run and the upper bound on them
  (:func:`atp_repro.mini.evaluate._family_rate_replicates`); its percentile interval is that of the
  seed mean (or of the difference of seed means).

The two half-widths add in quadrature on each side of the estimate (independent sources). With one
seed the training variation is unmeasured: the interval is the test-question one alone and
:attr:`SeedInterval.seed_halfwidth` is NaN, which the evidence strings say. A quantity without
test-question noise (kept tokens) then has no interval at all (NaN bounds), and a claim judged on it is
inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .evaluate import _all_nan_replicates_allowed, _family_rate_replicates, avg_rate, check_bootstrap, family_accuracy

LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class SeedInterval:
    """An estimate over seeds (a rate, a difference of rates, a token count) and its intervals.

    ``value`` is the mean over seeds (for a difference: mean of run a minus mean of run b); ``low`` and
    ``high`` combine ``seed_halfwidth`` with the test-question interval ``question_low..question_high``
    (equal to ``value`` +- 0 where the quantity has no test-question noise, e.g. token counts).
    """

    value: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    seed_sd: float
    seed_halfwidth: float
    question_low: float
    question_high: float
    seeds_per_run: tuple[int, ...] = ()  # a difference of two runs: how many seeds each has

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2

    def shown(self, scale: float = 100.0, unit: str = " points", digits: int = 1, signed: bool = True) -> str:
        """E.g. ``+2.3 points (95% interval +0.4 to +4.2; seeds +1.9, +2.8, +2.2)``."""
        sign = "+" if signed else ""
        f = f"{{:{sign}.{digits}f}}"
        uneven = len(self.seeds_per_run) == 2 and self.n_seeds == 1 and max(self.seeds_per_run) > 1
        if math.isnan(self.low) or math.isnan(self.high):
            why = ("seeds are its only source of noise, and one of the two runs has a single seed" if uneven
                   else "1 seed, and seeds are its only source of noise")
            return f"{f.format(scale * self.value)}{unit} (no interval: {why})"
        seeds = ", ".join(f.format(scale * v) for v in self.per_seed)
        if self.n_seeds > 1:
            spread = f"{self.n_seeds} seeds {seeds}"
        elif uneven:
            a, b = self.seeds_per_run
            spread = f"{a} and {b} seeds: training variation not measured, it needs two seeds of each run"
        else:
            spread = "1 seed: training variation not measured"
        sources = ("seeds" if self.question_low == self.question_high == self.value
                   else "seeds and test questions")
        return (f"{f.format(scale * self.value)}{unit} (95% interval {f.format(scale * self.low)} to "
                f"{f.format(scale * self.high)}, {sources}; {spread})")


def _t_halfwidth(values: Sequence[float], level: float) -> tuple[float, float]:
    """(sd, t-quantile x standard error of the mean) over seeds; NaN with fewer than two."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan"), float("nan")
    sd = float(v.std(ddof=1))
    return sd, float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * sd / math.sqrt(len(v)))


def _welch_halfwidth(a: Sequence[float], b: Sequence[float], level: float) -> float:
    """Welch half-width of mean(a) - mean(b) (independent seeds); NaN unless both have two or more."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se2 = va + vb
    if se2 == 0:
        return 0.0
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(stats.t.ppf(0.5 + level / 2, df) * math.sqrt(se2))


def _combine(value: float, q_low: float, q_high: float, seed_hw: float) -> tuple[float, float]:
    h = 0.0 if math.isnan(seed_hw) else seed_hw
    return value - math.hypot(value - q_low, h), value + math.hypot(q_high - value, h)


def _check(level: float, n_boot: int, **runs: Sequence) -> None:
    check_bootstrap(level, n_boot)
    for name, seq in runs.items():
        if len(seq) < 1:
            raise ValueError(f"{name} must hold the records of at least one seed, got none")


def _rate(records: pd.DataFrame, ub_acc: pd.Series) -> float:
    return avg_rate(family_accuracy(records), ub_acc)


def _ub_accuracy(upper_bound: pd.DataFrame, families: list[str] | None) -> pd.Series:
    acc = family_accuracy(upper_bound)
    return acc[[f for f in acc.index if families is None or f in families]]


def rate_over_seeds(records: Sequence[pd.DataFrame], upper_bound: pd.DataFrame, families: list[str] | None = None,
                    *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> SeedInterval:
    """Avg. Rate of one run over its seeds (``records``: one test-record frame per seed)."""
    _check(level, n_boot, records=records)
    ub_acc = _ub_accuracy(upper_bound, families)
    per_seed = tuple(_rate(r, ub_acc) for r in records)
    value = float(np.mean(per_seed))
    reps = _family_rate_replicates(records[0], upper_bound, families, n_boot, np.random.default_rng(seed),
                                   tuple(records[1:]))
    tail = 100 * (1 - level) / 2
    with _all_nan_replicates_allowed():
        q_low, q_high = np.nanpercentile(np.mean(reps, axis=0), [tail, 100 - tail])
    sd, hw = _t_halfwidth(per_seed, level)
    low, high = _combine(value, float(q_low), float(q_high), hw)
    return SeedInterval(value, low, high, per_seed, sd, hw, float(q_low), float(q_high))


def rate_difference_over_seeds(a: Sequence[pd.DataFrame], b: Sequence[pd.DataFrame], upper_bound: pd.DataFrame,
                               families: list[str] | None = None, *, level: float = LEVEL, n_boot: int = N_BOOT,
                               seed: int = 0, b_fixed: bool = False) -> SeedInterval:
    """Avg. Rate of run ``a`` minus run ``b`` (each a list of per-seed records) over seeds.

    ``per_seed`` pairs seed k of a with seed k of b (for display; the seeds of two runs are
    independent, so the seed half-width is Welch's, not a paired one). ``b_fixed``: ``b`` is one
    deterministic run (no training, e.g. a training-free baseline), so only ``a``'s seeds vary."""
    _check(level, n_boot, a=a, b=b)
    if b_fixed and len(b) != 1:
        raise ValueError(f"b_fixed needs the records of exactly one run in b, got {len(b)}")
    ub_acc = _ub_accuracy(upper_bound, families)
    ra, rb = [_rate(r, ub_acc) for r in a], [_rate(r, ub_acc) for r in b]
    value = float(np.mean(ra) - np.mean(rb))
    reps = _family_rate_replicates(a[0], upper_bound, families, n_boot, np.random.default_rng(seed),
                                   (*a[1:], *b))
    diff = np.mean(reps[: len(a)], axis=0) - np.mean(reps[len(a):], axis=0)
    tail = 100 * (1 - level) / 2
    with _all_nan_replicates_allowed():
        q_low, q_high = np.nanpercentile(diff, [tail, 100 - tail])
    hw = _t_halfwidth(ra, level)[1] if b_fixed else _welch_halfwidth(ra, rb, level)
    low, high = _combine(value, float(q_low), float(q_high), hw)
    per_seed = tuple(x - rb[0] for x in ra) if b_fixed else tuple(x - y for x, y in zip(ra, rb))
    sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")
    return SeedInterval(value, low, high, per_seed, sd, hw, float(q_low), float(q_high), (len(a), len(b)))


def _seed_only(value: float, seed_hw: float) -> tuple[float, float]:
    """Bounds of a quantity whose only noise is the seeds': undefined (NaN) with one seed.

    A claim judged on such an interval is then inconclusive (:meth:`atp_repro.paper.Claim.from_interval`):
    one training run measures no spread, so even a difference of 0.1 token would otherwise "hold"."""
    if math.isnan(seed_hw):
        return float("nan"), float("nan")
    return value - seed_hw, value + seed_hw


def value_over_seeds(values: Sequence[float], *, level: float = LEVEL) -> SeedInterval:
    """A quantity without test-question noise in this design (e.g. mean kept tokens) over seeds."""
    if len(values) < 1:
        raise ValueError("values must hold at least one seed's value")
    v = tuple(float(x) for x in values)
    value = float(np.mean(v))
    sd, hw = _t_halfwidth(v, level)
    low, high = _seed_only(value, hw)
    return SeedInterval(value, low, high, v, sd, hw, value, value)


def value_difference_over_seeds(a: Sequence[float], b: Sequence[float], *, level: float = LEVEL) -> SeedInterval:
    """mean(a) - mean(b) of such a quantity for two runs, with Welch's interval over their seeds."""
    if len(a) < 1 or len(b) < 1:
        raise ValueError("a and b must each hold at least one seed's value")
    value = float(np.mean(a) - np.mean(b))
    hw = _welch_halfwidth(a, b, level)
    low, high = _seed_only(value, hw)
    per_seed = tuple(float(x) - float(y) for x, y in zip(a, b))
    sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")
    return SeedInterval(value, low, high, per_seed, sd, hw, value, value, (len(a), len(b)))


__all__ = ["SeedInterval", "rate_difference_over_seeds", "rate_over_seeds", "value_difference_over_seeds",
           "value_over_seeds"]
