"""The paired statistics and verdict of ``crepa experiment`` on constructed numbers: a clear win, a
clear loss, pure noise and one seed, checked against closed forms (Student t with 2 degrees of
freedom), published power-table values and a Monte Carlo simulation of the paired t-test."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
from scipy import stats

from crepa.eval.evaluate import evaluate_clips
from crepa.eval.videos import find_clips
from crepa.experiment.report import comparisons, verdict_paragraphs
from crepa.experiment.runner import ExperimentResults, metric_spec
from crepa.experiment.stats import (
    benjamini_hochberg,
    holm_adjusted,
    motion_residuals,
    paired_t_p_values,
    tost,
)
from crepa.experiment.verdict import (
    DEFAULT_PRIMARY,
    MetricSpec,
    compare_all,
    compare_pair,
    exploratory_sentence,
    judge,
    method_sentence,
    motion_adjusted_values,
    paired_p_value,
    paired_t_power,
    pairs_in_order,
    questions_sentence,
    resolve_plan,
    seeds_for_power,
    summary_sentences,
    t_interval,
)
from crepa.io.video import write_video

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


# ---------------------------------------------------------------- corrections, equivalence, motion
def _holm_step_down(p: list[float], alpha: float) -> set[int]:
    """Holm's procedure as the textbook states it: walk the sorted p-values, reject while
    p_(i) <= alpha / (m - i + 1), stop at the first that is not."""
    rejected = set()
    for rank, index in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
        if p[index] > alpha / (len(p) - rank):
            break
        rejected.add(index)
    return rejected


def _bh_step_up(p: list[float], alpha: float) -> set[int]:
    """Benjamini-Hochberg as the textbook states it: the largest k with p_(k) <= k alpha / m; reject the
    k smallest."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    passing = [k for k in range(1, len(p) + 1) if p[order[k - 1]] <= k * alpha / len(p)]
    return set(order[: max(passing, default=0)])


def test_holm_and_bh_match_their_textbook_definitions():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(1 x 0.04, 0.06).
    np.testing.assert_allclose(holm_adjusted(np.array(p)), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    # BH by hand: q_(i) = min_{j >= i} m p_(j) / j -> 0.02, 0.02, 0.04, 0.04.
    np.testing.assert_allclose(benjamini_hochberg(np.array(p)), [0.02, 0.04, 0.04, 0.02], rtol=1e-12)
    rng = np.random.default_rng(1)
    for _ in range(300):
        m = int(rng.integers(1, 15))
        values = np.where(rng.random(m) < 0.4, rng.random(m) * 0.02, rng.random(m))
        for alpha in (0.05, 0.1):
            holm = holm_adjusted(values)
            assert {i for i in range(m) if holm[i] <= alpha} == _holm_step_down(list(values), alpha)
            bh = benjamini_hochberg(values)
            assert {i for i in range(m) if bh[i] <= alpha} == _bh_step_up(list(values), alpha)
        # The adjusted values themselves: Holm's max over the sorted prefix, BH's min over the suffix.
        order = np.argsort(values)
        ranked = values[order]
        holm_direct = [min(1, max((m - j) * ranked[j] for j in range(i + 1))) for i in range(m)]
        bh_direct = [min(1, min(m * ranked[j] / (j + 1) for j in range(i, m))) for i in range(m)]
        np.testing.assert_allclose(holm_adjusted(values)[order], holm_direct, rtol=1e-12)
        np.testing.assert_allclose(benjamini_hochberg(values)[order], bh_direct, rtol=1e-12)
    # Along the last axis: a batch of families is corrected family by family.
    batch = rng.random((5, 7))
    np.testing.assert_allclose(holm_adjusted(batch), [holm_adjusted(row) for row in batch])
    np.testing.assert_allclose(benjamini_hochberg(batch), [benjamini_hochberg(row) for row in batch])


def test_tost_matches_a_direct_t_computation():
    differences = np.array([0.0011, -0.0004, 0.0007, 0.0002, 0.0009])
    n, mean, se = 5, differences.mean(), differences.std(ddof=1) / math.sqrt(5)
    for margin in (0.0005, 0.002):
        result = tost(differences, margin)
        lower = stats.t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
        upper = stats.t.cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
        assert result.p_value == pytest.approx(max(lower, upper), rel=1e-10)
        half = stats.t.ppf(0.95, n - 1) * se
        assert result.interval == pytest.approx((mean - half, mean + half), rel=1e-10)
        inside = -margin < mean - half and mean + half < margin
        assert result.equivalent == inside == (max(lower, upper) < 0.05)
    assert tost(differences, 0.002).equivalent and not tost(differences, 0.0005).equivalent
    # scipy's own paired test gives the same one-sided p-values on the two samples.
    baseline = np.linspace(0.9, 0.95, 5)
    paired = stats.ttest_rel(baseline + differences, baseline - 0.002, alternative="greater").pvalue
    assert tost(differences, 0.002).p_value == pytest.approx(
        max(paired, stats.ttest_rel(baseline + differences, baseline + 0.002, alternative="less").pvalue)
    )
    constant = tost(np.array([0.001, 0.001, 0.001]), 0.002)
    assert constant.equivalent and constant.interval == (0.001, 0.001)
    assert not tost(np.array([0.003, 0.003]), 0.002).equivalent and tost(np.array([0.1]), 0.002) is None


def test_motion_residuals_are_the_least_squares_line():
    rng = np.random.default_rng(2)
    flow = rng.uniform(0.5, 3.0, 40)
    values = 0.99 - 0.01 * flow + rng.normal(0, 0.001, 40)
    residuals, slope = motion_residuals(values, flow)
    design = np.stack([np.ones(40), flow], 1)
    coefficients = np.linalg.solve(design.T @ design, design.T @ values)  # normal equations
    np.testing.assert_allclose(residuals, values - design @ coefficients, atol=1e-12)
    assert slope == pytest.approx(coefficients[1], rel=1e-9)
    still, zero = motion_residuals(values, np.ones(40))
    np.testing.assert_allclose(still, values - values.mean()) and zero == 0.0
    # Pooled over variants and seeds, each run summarised by its mean residual (NaN clips left out).
    per_clip = {
        "a": {0: (values[:10], flow[:10]), 1: (values[10:20], flow[10:20])},
        "b": {0: (values[20:30], flow[20:30]), 1: ([*values[30:39], math.nan], flow[30:40])},
    }
    kept = np.r_[0:39]
    pooled, _ = motion_residuals(values[kept], flow[kept])
    means = motion_adjusted_values(per_clip)
    assert means["a"][0] == pytest.approx(pooled[:10].mean()) and means["a"][1] == pytest.approx(
        pooled[10:20].mean()
    )
    assert means["b"][0] == pytest.approx(pooled[20:30].mean()) and means["b"][1] == pytest.approx(
        pooled[30:39].mean()
    )


def test_plan_defaults_and_refusals():
    cknna = MetricSpec("cknna", "CKNNA", higher_is_better=True)
    flicker = MetricSpec("temporal_flickering", "temporal flickering", higher_is_better=True)
    plan = resolve_plan([SUBJECT, WARPING, FLOW, cknna, flicker])
    assert plan.primary == (
        "subject_consistency",
        "temporal_flickering",
        "warping_error",
    )  # DEFAULT_PRIMARY measured
    assert plan.margins == {
        "subject_consistency": 0.002,
        "warping_error": 0.0005,
        "temporal_flickering": 0.002,
    }
    assert resolve_plan([SUBJECT], margins={"subject_consistency": 0.01}).margins == {
        "subject_consistency": 0.01
    }
    with pytest.raises(ValueError, match="cknna: a diagnostic of the trained representation"):
        resolve_plan([SUBJECT, cknna], primary=["cknna"])
    with pytest.raises(ValueError, match="--primary flow_magnitude: not a judged metric"):
        resolve_plan([SUBJECT, FLOW], primary=["flow_magnitude"])
    with pytest.raises(ValueError, match="must be a positive number"):
        resolve_plan([SUBJECT], margins={"subject_consistency": -1.0})


VARIANTS = ["none", "repa", "crepa"]


def _experiment_values(array: np.ndarray, metrics: list[MetricSpec]) -> dict:
    """(V, S, K) -> values[metric][variant][seed]."""
    return {
        m.key: {v: {s: float(array[i, s, k]) for s in range(array.shape[1])} for i, v in enumerate(VARIANTS)}
        for k, m in enumerate(metrics)
    }


def test_judge_corrects_within_each_family_and_reports_equivalence():
    cknna = MetricSpec("cknna", "CKNNA", higher_is_better=True)
    metrics = [SUBJECT, WARPING, cknna]
    rng = np.random.default_rng(3)
    array = rng.normal(0, 0.001, (3, 4, 3)) + rng.normal(0, 0.05, (1, 4, 1))  # a seed effect, shared
    array[2, :, 0] += 0.01  # CREPA is clearly more consistent
    plan = resolve_plan(metrics)
    found = judge(compare_all(metrics, VARIANTS, _experiment_values(array, metrics), 8), plan)
    primary = [c for c in found if c.family == "primary"]
    exploratory = [c for c in found if c.family == "exploratory"]
    assert [c.metric.key for c in exploratory] == ["cknna"] * 3 and len(primary) == 6
    np.testing.assert_allclose(
        [c.p_adjusted for c in primary], holm_adjusted(np.array([c.p_value for c in primary]))
    )
    np.testing.assert_allclose(
        [c.p_adjusted for c in exploratory], benjamini_hochberg(np.array([c.p_value for c in exploratory]))
    )
    assert all(c.family_size == 6 and c.correction == "holm" for c in primary)
    crepa = next(
        c
        for c in primary
        if (c.metric.key, c.candidate, c.baseline) == ("subject_consistency", "crepa", "none")
    )
    assert crepa.verdict == "better" and crepa.level == pytest.approx(0.05 / 6)
    assert crepa.seeds_needed == seeds_for_power(crepa.effect, 0.8, 0.05 / 6)
    # Warping error: no difference; its spread (0.0014 paired sd) against the default margin 0.0005.
    for c in (c for c in primary if c.metric.key == "warping_error"):
        equivalence = c.equivalence
        low, high = equivalence.interval
        assert c.verdict == ("within margin" if low > -0.0005 and high < 0.0005 else "undecided")
        assert c.verdict_phrase() == (
            "the effect lies within ±0.0005 (TOST at 5%)"
            if c.verdict == "within margin"
            else f"undecided: the interval [{low:+.3g}, {high:+.3g}] still allows an effect larger than the margin ±0.0005"
        )
    wide = replace(primary[3], margin=1.0)  # warping error, REPA* vs none
    assert (
        wide.verdict == "within margin" and wide.verdict_phrase() == "the effect lies within ±1 (TOST at 5%)"
    )
    record = crepa.record()
    for key in ("p_value", "p_adjusted", "correction", "family", "margin", "equivalence", "motion_adjusted"):
        assert key in record
    assert record["correction"] == "holm" and record["margin"] == 0.002
    text = " ".join(
        [
            questions_sentence(found, plan),
            *summary_sentences(found, LABELS),
            exploratory_sentence(found, LABELS),
        ]
    )
    assert "6 headline questions were asked (3 pairs x 2 primary metrics" in text
    assert "Holm-Bonferroni over all 6 at a family-wise error of 5%" in text
    assert "The other 3 comparisons are exploratory" in text
    assert "CREPA vs no alignment: better on subject consistency" in text


def _simulated_p_values(
    rng: np.random.Generator, experiments: int, seeds: int, effect: float = 0.0
) -> np.ndarray:
    """Paired t p-values (E, pairs, metrics) of simulated experiments: 3 variants x ``seeds`` x 11 metrics,
    a seed effect shared by the variants, unit noise per run (paired sd sqrt 2) and CREPA ahead by
    ``effect`` paired sds on metric 0."""
    values = rng.normal(0, 1, (experiments, 1, seeds, 11)) * 3 + rng.normal(0, 1, (experiments, 3, seeds, 11))
    values[:, 2, :, 0] += effect * math.sqrt(2)
    pairs = pairs_in_order(range(3))
    differences = np.stack(
        [values[:, later] - values[:, earlier] for later, earlier in pairs], 1
    )  # (E, P, S, K)
    return paired_t_p_values(np.moveaxis(differences, 2, -1))  # (E, P, K)


def test_pure_noise_makes_a_headline_claim_in_at_most_6_percent_of_experiments():
    # 1000 experiments, 4 seeds, 3 pairs x 11 metrics, the first 4 primary: family-wise error 5 %.
    p = _simulated_p_values(np.random.default_rng(4), 1000, 4)
    headline = holm_adjusted(p[:, :, :4].reshape(1000, 12))
    claims = (headline < 0.05).any(-1)
    assert claims.mean() <= 0.06
    uncorrected = (p < 0.05).any((1, 2))
    assert (
        uncorrected.mean() > 0.5
    )  # what the uncorrected verdict did: most noise experiments "found" something
    # The verdict itself (judge) makes exactly these claims: the first 40 experiments through it.
    metrics = [MetricSpec(key, key, True) for key in DEFAULT_PRIMARY] + [
        MetricSpec(f"exploratory_{k}", f"exploratory {k}", True) for k in range(7)
    ]
    plan = resolve_plan(metrics)
    rng = np.random.default_rng(4)
    values = rng.normal(0, 1, (1000, 1, 4, 11)) * 3 + rng.normal(0, 1, (1000, 3, 4, 11))
    for index in range(40):
        found = judge(compare_all(metrics, VARIANTS, _experiment_values(values[index], metrics), 8), plan)
        claimed = any(c.family == "primary" and c.outcome != "no difference" for c in found)
        assert claimed == claims[index]


def test_a_true_effect_of_three_paired_sds_is_called_in_80_percent_of_experiments():
    p = _simulated_p_values(np.random.default_rng(5), 200, 8, effect=3.0)
    headline = holm_adjusted(p[:, :, :4].reshape(200, 12))  # pairs x primary metrics, pair-major
    crepa_vs_none = headline[:, 1 * 4 + 0]  # pairs_in_order: (repa, none), (crepa, none), (crepa, repa)
    assert (crepa_vs_none < 0.05).mean() >= 0.8


def _panning_clip(texture: np.ndarray, contrast: float, speed: int, noise: np.ndarray) -> np.ndarray:
    """A window of ``texture`` (H, W', 3) panned ``speed`` pixels per frame: uint8 (T, H, H, 3)."""
    size = texture.shape[0]
    frames = np.stack([contrast * texture[:, speed * t : speed * t + size] for t in range(len(noise))])
    return np.clip(128 + frames + noise, 0, 255).round().astype(np.uint8)


def test_a_variant_that_only_moves_less_is_explained_by_less_motion(tmp_path):
    """Two variants play the same panning clips (same texture, contrast, sensor noise level), "still" at
    half the displacement per frame of "moving": less motion alone raises temporal flickering's score.
    Real mp4 files measured by crepa eval; the report's verdict must call it explained by less motion."""
    frames, size, seeds, clips = 8, 48, 4, 6
    rng = np.random.default_rng(0)
    rows: dict[str, dict] = {}
    for seed in range(seeds):
        folders = {variant: tmp_path / f"{variant}-seed{seed}" for variant in ("moving", "still")}
        for index in range(clips):
            texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size + 4 * frames, 3)), (0, 0), 5)
            texture /= texture.std()
            contrast, speed = rng.uniform(15, 40), int(rng.choice([2, 4]))
            for variant, pace in (("moving", speed), ("still", speed // 2)):
                noise = rng.normal(0, 2, (frames, size, size, 3))
                clip = _panning_clip(texture, contrast, pace, noise)
                write_video(folders[variant] / f"clip-{index}.mp4", clip, crf=0)
        for folder in folders.values():
            metrics = ["temporal_flickering", "warping_error", "flow_magnitude"]
            rows[folder.name] = evaluate_clips(find_clips(folder), metrics, {}, progress=False).summary
    results = ExperimentResults(
        variants=[{"name": "moving", "label": "moving"}, {"name": "still", "label": "still"}],
        seeds=list(range(seeds)),
        prompts=["a prompt"] * clips,
        metrics=[metric_spec(key) for key in ("temporal_flickering", "warping_error", "flow_magnitude")],
        rows=rows,
        runs=list(rows),
        base=False,
        stage_seconds={},
        work={},
        machine={},
        out=tmp_path,
    )
    found = {c.metric.key: c for c in comparisons(results)}
    flicker = found["temporal_flickering"]
    # Unadjusted, less motion is a clear Holm-corrected gain in flicker ...
    assert flicker.family == "primary" and flicker.outcome == "better" and flicker.p_adjusted < 0.01
    # ... that the comparison at matched motion does not find: explained by less motion.
    assert flicker.motion is not None and flicker.motion.outcome == "no difference"
    assert flicker.verdict == "explained by less motion"
    assert flicker.verdict_phrase().startswith(
        "explained by less motion: better before the motion adjustment"
    )
    summary = " ".join(verdict_paragraphs(results, list(found.values()))["summary"])
    assert "temporal flickering explained by less motion" in summary
    assert "warping error explained by less motion" in summary  # the slower clips warp worse, also by motion
    assert "better on" not in summary
    record = flicker.record()["motion_adjusted"]
    assert record["outcome"] == "no difference" and record["correction"] == "holm"
