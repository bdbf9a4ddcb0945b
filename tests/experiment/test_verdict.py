"""The paired statistics and verdict of ``crepa experiment`` on constructed numbers: a clear win, a
clear loss, pure noise and one seed, checked against closed forms (Student t with 2 degrees of
freedom), published power-table values and a Monte Carlo simulation of the paired t-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from crepa.experiment.verdict import (
    MetricSpec,
    compare_all,
    compare_pair,
    method_sentence,
    paired_p_value,
    paired_t_power,
    seeds_for_power,
    summary_sentences,
    t_interval,
)

SUBJECT = MetricSpec("subject_consistency", "subject consistency", higher_is_better=True)
WARPING = MetricSpec("warping_error", "warping error", higher_is_better=False)
FLOW = MetricSpec("flow_magnitude", "flow magnitude", higher_is_better=None)
LABELS = {"none": "no alignment", "crepa": "CREPA"}


def _values(baseline: list[float], differences: list[float]) -> dict[str, dict[int, float]]:
    return {
        "none": dict(enumerate(baseline)),
        "crepa": {seed: value + d for seed, (value, d) in enumerate(zip(baseline, differences, strict=True))},
    }


def test_t_interval_and_p_value_match_the_closed_form_for_two_degrees_of_freedom():
    # Student t with 2 df: quantile q(p) = (2p - 1) / sqrt(2 p (1 - p)), two-sided p = 1 - |t| / sqrt(2 + t^2).
    differences = [1.0, 2.0, 4.0]
    mean, sd = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    quantile = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)
    low, high = t_interval(differences)
    assert low == pytest.approx(mean - quantile * sd / math.sqrt(3), rel=1e-9)
    assert high == pytest.approx(mean + quantile * sd / math.sqrt(3), rel=1e-9)
    statistic = mean / (sd / math.sqrt(3))
    assert paired_p_value(differences) == pytest.approx(1 - statistic / math.sqrt(2 + statistic**2), rel=1e-9)
    assert t_interval([1.0]) is None and paired_p_value([1.0]) is None


def test_seeds_for_power_matches_published_values_and_a_simulation():
    # Two-sided one-sample / paired t-test, alpha 0.05, power 0.8 (Cohen's tables, G*Power): d = 0.5 -> 34, d = 1 -> 10.
    assert seeds_for_power(0.5) == 34
    assert seeds_for_power(1.0) == 10
    assert seeds_for_power(0.0) is None and seeds_for_power(math.inf) == 2
    assert seeds_for_power(1e-4) is None  # beyond the search range: "more than"
    # Monte Carlo of the test itself: n = 10 pairs with true effect 1.0.
    rng = np.random.default_rng(0)
    samples = rng.normal(1.0, 1.0, size=(40_000, 10))
    statistic = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(10))
    simulated = np.mean(np.abs(statistic) > stats.t.ppf(0.975, 9))
    assert paired_t_power(1.0, 10) == pytest.approx(simulated, abs=0.01)


def test_clear_win_is_better():
    values = _values([0.80, 0.84, 0.78], [0.050, 0.052, 0.048])
    comparison = compare_pair(SUBJECT, "crepa", "none", values, clips=8)
    assert comparison.outcome == "better"
    assert comparison.mean == pytest.approx(0.05)
    low, high = comparison.interval
    assert 0 < low < 0.05 < high
    sentence = comparison.sentence(LABELS)
    assert sentence.startswith("CREPA vs no alignment, subject consistency (higher is better): better: ")
    assert "mean paired difference +0.05, 95% CI [+0.045, +0.055] (paired t over 3 seeds" in sentence
    assert comparison.seeds_needed == 2 and "needs 2 seeds" in sentence
    # Unpaired, the seed-to-seed spread of the baseline (0.03) would hide this 0.05 lead.
    spread = np.std([0.80, 0.84, 0.78], ddof=1) + np.std([0.85, 0.892, 0.828], ddof=1)
    assert spread > 0.05


def test_clear_loss_on_a_lower_is_better_metric_is_worse():
    values = _values([0.010, 0.014, 0.012], [0.004, 0.005, 0.0045])  # warping error went up
    comparison = compare_pair(WARPING, "crepa", "none", values, clips=8)
    assert comparison.outcome == "worse"
    assert comparison.sentence(LABELS).startswith(
        "CREPA vs no alignment, warping error (lower is better): worse: mean paired difference +0.0045"
    )
    falling = compare_pair(WARPING, "crepa", "none", _values([0.010, 0.014, 0.012], [-0.004] * 3), 8)
    assert falling.outcome == "better" and falling.seeds_needed == 2  # constant difference: zero spread


def test_pure_noise_is_no_difference_and_says_how_many_seeds_would_tell():
    differences = [0.03, -0.02, 0.002]
    comparison = compare_pair(SUBJECT, "crepa", "none", _values([0.8, 0.8, 0.8], differences), clips=8)
    assert comparison.outcome == "no difference"
    low, high = comparison.interval
    assert low < 0 < high
    # Normal approximation with Guenther's correction, accurate to about one seed.
    effect = abs(np.mean(differences)) / np.std(differences, ddof=1)
    approximate = ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / effect) ** 2 + stats.norm.ppf(
        0.975
    ) ** 2 / 2
    assert abs(comparison.seeds_needed - approximate) <= 1.5
    sentence = comparison.sentence(LABELS)
    assert "no difference detectable with 3 seeds and 8 clips: mean paired difference" in sentence
    assert (
        f"needs {comparison.seeds_needed} seeds (for 80% power of a two-sided paired t-test at 5%" in sentence
    )


def test_one_seed_gives_no_interval_and_no_verdict():
    comparison = compare_pair(SUBJECT, "crepa", "none", _values([0.8], [0.3]), clips=6)
    assert comparison.outcome == "no difference" and comparison.interval is None
    assert comparison.seeds_needed is None
    sentence = comparison.sentence(LABELS)
    assert "no difference detectable with 1 seed and 6 clips" in sentence
    assert "the one seed gives a difference of +0.3 but no confidence interval" in sentence
    assert "seeds needed to detect it are unknown" in sentence
    assert "one seed per variant" in method_sentence(1, 6)


def test_pairs_only_seeds_measured_for_both_and_summarises_per_pair():
    values = {
        "subject_consistency": {
            "none": {0: 0.80, 1: 0.84, 2: 0.78, 3: 0.9},
            "repa": {0: 0.81, 1: 0.83, 2: 0.80, 3: None},
            "crepa": {0: 0.85, 1: 0.892, 2: 0.828, 3: math.nan},
        },
        "flow_magnitude": {v: {0: 1.0, 1: 1.0, 2: 1.0} for v in ("none", "repa", "crepa")},
    }
    comparisons = compare_all([SUBJECT, FLOW], ["none", "repa", "crepa"], values, clips=8)
    assert [(c.candidate, c.baseline) for c in comparisons] == [
        ("repa", "none"),
        ("crepa", "none"),
        ("crepa", "repa"),
    ]
    assert all(c.seeds == (0, 1, 2) for c in comparisons)  # seed 3 lacks a finite value; flow is not judged
    text = summary_sentences(comparisons, {"none": "no alignment", "repa": "REPA*", "crepa": "CREPA"})
    assert (
        text[0] == "REPA* vs no alignment: no difference detectable with 3 seeds and 8 clips on any metric."
    )
    assert text[1] == "CREPA vs no alignment: better on subject consistency, worse on no metric."
