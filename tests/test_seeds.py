"""Intervals over training seeds (atp_repro.mini.seeds): each check fails on a plausible wrong formula."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from atp_repro.mini.seeds import (
    rate_difference_over_seeds,
    rate_over_seeds,
    value_difference_over_seeds,
    value_over_seeds,
)
from atp_repro.paper import Claim


def _records(correct) -> pd.DataFrame:
    correct = list(correct)
    return pd.DataFrame({"index": range(len(correct)), "family": "counting", "correct": correct})


def _seeds(rng, ub: np.ndarray, keep: list[float]) -> list[pd.DataFrame]:
    """Per seed: a run that keeps a fraction ``keep[k]`` of the upper bound's right answers."""
    return [_records(ub & (rng.random(len(ub)) < k)) for k in keep]


def test_value_over_seeds_is_the_t_interval_of_the_mean():
    est = value_over_seeds([30.0, 32.0, 34.0])
    hw = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)  # sd 2, 3 seeds: a t (not normal) quantile, 2 d.o.f.
    assert est.value == pytest.approx(32.0)
    assert est.seed_sd == pytest.approx(2.0)
    assert (est.low, est.high) == pytest.approx((32.0 - hw, 32.0 + hw))
    assert est.n_seeds == 3 and est.per_seed == (30.0, 32.0, 34.0)
    single = value_over_seeds([31.0])  # one seed: no spread measured and no other source of noise
    assert math.isnan(single.seed_halfwidth) and math.isnan(single.low) and math.isnan(single.high)
    assert "no interval: 1 seed" in single.shown(scale=1, unit=" tokens")
    assert Claim.from_interval("more tokens", single.low, single.high, 0.0).inconclusive
    assert Claim.within("near the goal", single.low - 31.0, single.high - 31.0, 5.0).inconclusive
    one_each = value_difference_over_seeds([130.4], [130.2])  # a 0.2-token step of one run each: undecided
    assert one_each.value == pytest.approx(0.2) and math.isnan(one_each.low)
    assert Claim.from_interval("row 3 keeps more", one_each.low, one_each.high, 0.0).inconclusive
    assert "interval 30.0 to 34.0" not in est.shown(scale=1) and ", seeds; 3 seeds" in est.shown(scale=1)


def test_value_difference_uses_welch_over_independent_seeds():
    a, b = [10.0, 12.0, 14.0], [1.0, 1.5, 2.0]
    est = value_difference_over_seeds(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    hw = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert est.value == pytest.approx(12.0 - 1.5)
    assert (est.low, est.high) == pytest.approx((10.5 - hw, 10.5 + hw))
    # Pairing seed k of a with seed k of b would remove the shared trend (sd of differences 0.75):
    paired_hw = stats.t.ppf(0.975, 2) * np.std(np.subtract(a, b), ddof=1) / math.sqrt(3)
    assert est.high - est.low > 2 * paired_hw + 1e-9


def test_rate_over_seeds_mean_and_a_wider_interval_when_seeds_disagree():
    rng = np.random.default_rng(0)
    ub = rng.random(3000) < 0.8
    agree = _seeds(rng, ub, [0.9, 0.9, 0.9])
    spread = _seeds(rng, ub, [0.8, 0.9, 1.0])
    ubr = _records(ub)
    est = rate_over_seeds(spread, ubr)
    rates = [r.correct.sum() / ub.sum() for r in spread]
    assert est.value == pytest.approx(np.mean(rates))
    assert est.per_seed == pytest.approx(tuple(rates))
    assert est.question_low < est.value < est.question_high
    # The combined interval contains the question interval and the seed half-width on each side.
    assert est.low <= est.question_low and est.high >= est.question_high
    assert est.value - est.low >= est.seed_halfwidth - 1e-12
    assert est.seed_halfwidth == pytest.approx(stats.t.ppf(0.975, 2) * np.std(rates, ddof=1) / math.sqrt(3))
    tight = rate_over_seeds(agree, ubr)
    assert est.high - est.low > 3 * (tight.high - tight.low)
    assert rate_over_seeds(spread, ubr) == est  # seeded bootstrap: the same twice


def test_rate_over_one_seed_is_the_question_interval():
    from atp_repro.mini.evaluate import avg_rate_interval

    rng = np.random.default_rng(1)
    ub = rng.random(2000) < 0.7
    (run,) = _seeds(rng, ub, [0.9])
    est = rate_over_seeds([run], _records(ub))
    assert (est.low, est.high) == pytest.approx(avg_rate_interval(run, _records(ub)))
    assert math.isnan(est.seed_halfwidth)


def test_rate_difference_over_seeds_sign_and_width():
    rng = np.random.default_rng(2)
    ub = rng.random(3000) < 0.8
    better, worse = _seeds(rng, ub, [0.95, 0.96, 0.94]), _seeds(rng, ub, [0.85, 0.86, 0.84])
    d = rate_difference_over_seeds(better, worse, _records(ub))
    assert d.value == pytest.approx(np.mean([r.correct.sum() for r in better]) / ub.sum()
                                    - np.mean([r.correct.sum() for r in worse]) / ub.sum())
    assert 0 < d.low < d.value < d.high
    reverse = rate_difference_over_seeds(worse, better, _records(ub))
    assert reverse.value == pytest.approx(-d.value) and reverse.high < 0
    same = rate_difference_over_seeds(better, better, _records(ub))
    # The same seeds on both sides: no test-question noise in the difference, but the seeds count as
    # independent draws, so the interval straddles 0 (Welch) and "a beats a" is never decided.
    assert same.value == 0 and (same.question_low, same.question_high) == (0, 0)
    assert same.low == pytest.approx(-same.high) and same.low < 0
    # A run that equals the other on seed 0 but not on the others: the seeds make the interval straddle 0.
    mixed = [better[0], worse[1], better[2]]
    assert rate_difference_over_seeds(mixed, [better[0], better[1], worse[2]], _records(ub)).low < 0


def test_seed_intervals_reject_empty_runs_and_bad_levels():
    with pytest.raises(ValueError, match="records"):
        rate_over_seeds([], _records([True]))
    with pytest.raises(ValueError, match="level"):
        rate_over_seeds([_records([True])], _records([True]), level=95)
    with pytest.raises(ValueError, match="a and b"):
        value_difference_over_seeds([], [1.0])


def test_bootstrap_replicates_without_a_rate_are_nan_without_warnings() -> None:
    """A family the upper bound gets right once in 40: most replicates have no rate (NaN), quietly."""
    import warnings

    from atp_repro.mini.evaluate import avg_rate_interval, rate_difference_interval

    ub = _records([1] + [0] * 39)
    run, other = _records([1] * 40), _records([0] * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        low, high = avg_rate_interval(run, ub, n_boot=200)
        diff, d_low, d_high = rate_difference_interval(run, other, ub, n_boot=200)
        all_nan = rate_difference_interval(run, other, _records([0] * 40), n_boot=50)
        over_seeds = rate_over_seeds([run, run], _records([0] * 40), n_boot=50)
        diff_over_seeds = rate_difference_over_seeds([run, run], [other, other], _records([0] * 40), n_boot=50)
    assert np.isfinite([low, high, diff, d_low, d_high]).all() and low <= high and d_low <= diff <= d_high
    assert np.isnan(all_nan[1]) and np.isnan(all_nan[2])  # no replicate has a rate
    assert np.isnan(over_seeds.question_low) and np.isnan(diff_over_seeds.question_low)


def test_rate_difference_against_a_fixed_run_counts_only_the_trained_seeds():
    rng = np.random.default_rng(5)
    ub = rng.random(3000) < 0.8
    trained, fixed = _seeds(rng, ub, [0.95, 0.90, 0.93]), _seeds(rng, ub, [0.85])
    d = rate_difference_over_seeds(trained, fixed, _records(ub), b_fixed=True)
    rates = [r.correct.sum() / ub.sum() for r in trained]
    hw = stats.t.ppf(0.975, 2) * np.std(rates, ddof=1) / math.sqrt(3)
    assert d.seed_halfwidth == pytest.approx(hw)  # one-sample t over the trained seeds, not NaN
    assert d.high - d.low >= 2 * hw * 0.99
    assert len(d.per_seed) == 3
    # without b_fixed a single run on one side has no seed spread at all (only the questions')
    loose = rate_difference_over_seeds(trained, fixed, _records(ub))
    assert (loose.high - loose.low) < (d.high - d.low)
    with pytest.raises(ValueError, match="b_fixed"):
        rate_difference_over_seeds(trained, trained, _records(ub), b_fixed=True)


def test_a_difference_of_runs_with_uneven_seeds_says_which_spread_is_missing():
    """3 seeds against 1: Welch cannot be formed, and the evidence must not claim a single seed overall."""
    rng = np.random.default_rng(4)
    ub = rng.random(2000) < 0.8
    three, one = _seeds(rng, ub, [0.95, 0.94, 0.96]), _seeds(rng, ub, [0.85])
    d = rate_difference_over_seeds(three, one, _records(ub))
    assert d.seeds_per_run == (3, 1) and math.isnan(d.seed_halfwidth)
    assert "3 and 1 seeds: training variation not measured" in d.shown() and "1 seed:" not in d.shown()
    both = rate_difference_over_seeds(three, three[::-1], _records(ub))
    assert "3 seeds" in both.shown() and "not measured" not in both.shown()
    tokens = value_difference_over_seeds([14.5, 14.4, 14.6], [14.3])
    assert math.isnan(tokens.low) and "one of the two runs has a single seed" in tokens.shown(scale=1, unit=" tokens")
    assert "1 seed:" in rate_difference_over_seeds(three[:1], one, _records(ub)).shown()
