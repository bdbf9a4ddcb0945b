"""Paired statistics of an experiment and the verdict they support (pure numbers, no I/O).

At a given seed every variant of an experiment sees the same batches, noise and timesteps, and is
sampled from the same noise; what differs between two variants at one seed is the variant. So two
variants are compared through their per-seed differences d_s = candidate_s - baseline_s (each value
already a mean over the M evaluated clips of that run), not through their separate spreads:

- the estimate is the mean paired difference with a two-sided Student t confidence interval,
  mean(d) ± t_{1-a/2, n-1} * sd(d) / sqrt(n) (sd with ddof 1), and the two-sided paired t-test.
- the questions are declared first (:class:`AnalysisPlan`): the primary metrics' tests over every pair
  form the headline family, corrected with Holm-Bonferroni (family-wise error a); every other test is
  exploratory, with a Benjamini-Hochberg q-value, and never called an effect (:func:`judge`). Where
  nothing is detected, TOST against the metric's margin says "within ±margin" or "undecided"; the
  consistency metrics are also compared on their residuals after regressing them on flow magnitude,
  so a gain that only comes from less motion is reported as such (:mod:`crepa.experiment.stats`).
- the seeds needed to detect the observed difference: the smallest n >= 2 at which the two-sided paired
  t-test at the corrected level (a / family size) reaches the target power (default 80 %) for the observed standardised effect
  |mean(d)| / sd(d), from the noncentral t distribution (the exact power of the t-test, not the normal
  approximation).
- one seed gives one difference and no estimate of its spread: no interval, no test, no power, and the
  verdict says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np
from scipy import stats

from crepa.experiment.stats import (
    ALPHA,
    Equivalence,
    benjamini_hochberg,
    holm_adjusted,
    motion_residuals,
    paired_t_p_values,
    sample_sd,
    tost,
)

Outcome = Literal["better", "worse", "no difference"]
CONFIDENCE = 0.95
POWER = 0.80
MAX_SEEDS = 100_000  # above this, the seeds needed are reported as "more than"


@dataclass(frozen=True)
class MetricSpec:
    """A metric of the experiment: its key in the evaluation, a title for sentences and tables, and
    which direction is better (None: a context measure, shown but never judged, e.g. motion)."""

    key: str
    title: str
    higher_is_better: bool | None
    short: str = ""  # for narrow (terminal) tables; the title when empty

    @property
    def arrow(self) -> str:
        return {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]

    @property
    def direction(self) -> str:
        return {True: "higher", False: "lower", None: "context"}[self.higher_is_better]


@dataclass(frozen=True)
class Aggregate:
    """One metric of one variant over seeds, for tables (the verdict uses the paired differences)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof 1); 0 for a single value."""
        return float(sample_sd(np.asarray(self.values, dtype=np.float64))) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        """Mean (4 significant digits) ± std (2), the one value, or "-" when nothing was measured."""
        if not self.values:
            return "-"
        return f"{fmt(self.mean)} ± {fmt(self.std, 2)}" if len(self.values) > 1 else fmt(self.mean)


def t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided Student t interval of the mean of ``differences``; None with fewer than two values."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size < 2:
        return None
    mean = float(values.mean())
    half = (
        float(stats.t.ppf(0.5 + confidence / 2, values.size - 1))
        * float(sample_sd(values))
        / math.sqrt(values.size)
    )
    return mean - half, mean + half


def paired_p_value(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test (H0: mean difference 0); None with fewer than two values.
    Zero spread gives 0 for a non-zero mean and 1 for a zero mean."""
    values = np.asarray(differences, dtype=np.float64)
    return None if values.size < 2 else float(paired_t_p_values(values))


def paired_t_power(effect: float, seeds: int, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``seeds`` pairs when the true
    standardised mean difference is ``effect`` (mean / sd of the differences)."""
    df = seeds - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = abs(effect) * math.sqrt(seeds)
    power = float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))
    if math.isfinite(power):
        return power
    # scipy's noncentral t returns NaN for large shifts; there t is close to normal and power close to 1.
    return float(stats.norm.sf(critical - shift) + stats.norm.cdf(-critical - shift))


def seeds_for_power(effect: float, power: float = POWER, alpha: float = 1 - CONFIDENCE) -> int | None:
    """Smallest number of seeds (>= 2) at which the paired t-test detects a standardised difference
    ``effect`` with probability ``power``; None for a zero effect (nothing to detect) and for one that
    needs more than :data:`MAX_SEEDS`. Power grows with the seeds, so a bisection finds it."""
    if effect == 0.0:
        return None
    if math.isinf(effect) or paired_t_power(effect, 2, alpha) >= power:
        return 2
    if paired_t_power(effect, MAX_SEEDS, alpha) < power:
        return None
    low, high = 2, MAX_SEEDS  # power(low) < power <= power(high)
    while high - low > 1:
        middle = (low + high) // 2
        if paired_t_power(effect, middle, alpha) >= power:
            high = middle
        else:
            low = middle
    return high


Family = Literal["", "primary", "exploratory"]
CORRECTIONS = {"primary": "holm", "exploratory": "benjamini-hochberg"}
CORRECTION_TITLES = {"holm": "Holm", "benjamini-hochberg": "BH", "none": "none"}


@dataclass(frozen=True)
class PairedComparison:
    """``candidate`` against ``baseline`` on one metric, over the seeds both were measured at.

    ``differences`` are candidate - baseline per seed, in the metric's units; ``clips`` is the number
    of clips each run was evaluated on. As made by :func:`compare_pair` it is one test on its own (no
    correction); :func:`judge` places it in its family: ``primary`` (Holm over the ``family_size``
    headline tests) or ``exploratory`` (Benjamini-Hochberg q-value), with the metric's equivalence
    ``margin`` and, for a consistency metric, the same comparison at matched motion (``motion``)."""

    metric: MetricSpec
    candidate: str
    baseline: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    clips: int
    confidence: float = CONFIDENCE
    power: float = POWER
    family: Family = ""
    p_adjusted: float | None = None
    family_size: int = 1
    margin: float | None = None
    motion: PairedComparison | None = None
    flow_difference: float | None = None  # of a motion-adjusted comparison: mean paired flow magnitude change

    @property
    def count(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences)) if self.differences else math.nan

    @property
    def sd(self) -> float | None:
        """Standard deviation of the paired differences (ddof 1); None with fewer than two seeds."""
        return float(sample_sd(np.asarray(self.differences, dtype=np.float64))) if self.count > 1 else None

    @property
    def alpha(self) -> float:
        return round(1 - self.confidence, 12)  # 0.05, not 0.050000000000000044

    @property
    def correction(self) -> str:
        return CORRECTIONS.get(self.family, "none")

    @property
    def interval(self) -> tuple[float, float] | None:
        return t_interval(self.differences, self.confidence)

    @property
    def p_value(self) -> float | None:
        return paired_p_value(self.differences)

    @property
    def outcome(self) -> Outcome:
        """Better or worse when the test rejects at its level (on the candidate's good / bad side): the
        interval excludes 0 for a test on its own, the adjusted p is below alpha in a family."""
        if self.metric.higher_is_better is None or self.count < 2:
            return "no difference"
        if self.family:
            detected = self.p_adjusted is not None and self.p_adjusted < self.alpha
        else:
            low, high = self.interval  # type: ignore[misc]
            detected = low > 0 or high < 0
        if not detected or self.mean == 0.0:
            return "no difference"
        return "better" if (self.mean > 0) == self.metric.higher_is_better else "worse"

    @property
    def explained_by_motion(self) -> bool:
        """A detected difference that the same test on the motion-adjusted values does not detect."""
        return (
            self.outcome != "no difference"
            and self.motion is not None
            and self.motion.outcome != self.outcome
        )

    @property
    def verdict(self) -> str:
        """The headline category: better, worse, explained by less / more motion (a difference that does
        not survive the motion adjustment, by the candidate's change in flow magnitude), within margin,
        undecided, or no difference (no margin)."""
        if self.outcome != "no difference":
            if self.explained_by_motion:
                flow = self.motion.flow_difference  # type: ignore[union-attr]
                if flow is None or flow == 0.0:
                    return "explained by the difference in motion"
                return "explained by less motion" if flow < 0 else "explained by more motion"
            return self.outcome
        equivalence = self.equivalence
        if equivalence is None:
            return "no difference"
        return "within margin" if equivalence.equivalent else "undecided"

    @cached_property
    def equivalence(self) -> Equivalence | None:
        """TOST against ±:attr:`margin` at alpha (None without a margin or with one seed)."""
        return None if self.margin is None else tost(np.asarray(self.differences), self.margin, self.alpha)

    @property
    def effect(self) -> float | None:
        """Observed standardised difference |mean| / sd (inf for a constant non-zero difference)."""
        sd = self.sd
        if sd is None:
            return None
        if sd == 0.0:
            return 0.0 if self.mean == 0.0 else math.inf
        return abs(self.mean) / sd

    @property
    def level(self) -> float:
        """The level the seeds needed are computed at: alpha for a test on its own, alpha / family size
        (Bonferroni: the strictest step of Holm and of BH, enough whatever the other tests show) in a
        family."""
        return self.alpha / max(self.family_size, 1) if self.family else self.alpha

    @property
    def seeds_needed(self) -> int | None:
        """Seeds for the paired t-test at :attr:`level` to detect the observed difference with
        :attr:`power`; None when unknown (one seed, a zero difference, or more than :data:`MAX_SEEDS`)."""
        effect = self.effect
        return None if effect is None else seeds_for_power(effect, self.power, self.level)

    def record(self) -> dict[str, Any]:
        """Everything about this comparison as plain JSON values."""
        interval = self.interval
        equivalence = self.equivalence
        return {
            "metric": self.metric.key,
            "higher_is_better": self.metric.higher_is_better,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "seeds": list(self.seeds),
            "differences": list(self.differences),
            "clips": self.clips,
            "mean_difference": self.mean if self.count else None,
            "confidence": self.confidence,
            "interval": None if interval is None else list(interval),
            "method": "paired Student t interval / two-sided paired t-test",
            "p_value": self.p_value,
            "family": self.family or None,
            "correction": self.correction,
            "family_size": self.family_size,
            "p_adjusted": self.p_adjusted,
            "outcome": self.outcome,
            "verdict": self.verdict,
            "verdict_text": self.verdict_phrase(),
            "margin": self.margin,
            "equivalence": None if equivalence is None else equivalence.record(),
            "motion_adjusted": None if self.motion is None else self.motion.motion_record(),
            "seeds_needed": self.seeds_needed,
            "seeds_needed_level": self.level,
            "power": self.power,
            "sentence": self.sentence(),
        }

    def motion_record(self) -> dict[str, Any]:
        """This comparison as the motion-adjusted version of another (residual units)."""
        interval = self.interval
        return {
            "method": "per-clip metric regressed on flow magnitude (pooled over variants and seeds); paired t on "
            "the per-seed mean residuals",
            "differences": list(self.differences),
            "mean_difference": self.mean if self.count else None,
            "interval": None if interval is None else list(interval),
            "p_value": self.p_value,
            "p_adjusted": self.p_adjusted,
            "correction": self.correction,
            "outcome": self.outcome,
            "flow_difference": self.flow_difference,
        }

    def power_sentence(self) -> str:
        """How many seeds the observed difference needs, or why that is unknown."""
        effect = self.effect
        if effect is None:
            return "one seed gives no spread, so the seeds needed to detect it are unknown"
        if effect == 0.0:
            return "the paired differences are all zero"
        needed = self.seeds_needed
        level = f"{self.level:.2g}" if self.family else f"{self.alpha:.0%}"
        corrected = f" ({self.alpha:.0%} / {self.family_size} tests)" if self.family else ""
        method = (
            f"for {self.power:.0%} power of a two-sided paired t-test at {level}{corrected} (noncentral t), "
            f"effect size {effect:.2g}"
        )
        if needed is None:
            return f"detecting a difference this size would need more than {MAX_SEEDS} seeds ({method})"
        return f"detecting a difference this size needs {needed} seeds ({method})"

    def verdict_phrase(self) -> str:
        """The verdict in words: better / worse (or, exploratory, higher / lower with its q-value),
        explained by motion, the equivalence outcome, or no difference detectable with N seeds and M
        clips."""
        verdict = self.verdict
        if self.family == "exploratory" and self.outcome != "no difference":
            direction = "higher" if self.mean > 0 else "lower"
            return f"exploratory: {direction} (q = {fmt(self.p_adjusted or 0.0, 2)}), a lead, not an effect"
        if verdict.startswith("explained"):
            return (
                f"{verdict}: {self.outcome} before the motion adjustment, not at matched motion "
                f"({CORRECTION_TITLES[self.correction]}-adjusted p = {fmt(self.motion.p_adjusted or 1.0, 2)})"  # type: ignore[union-attr]
            )
        if verdict in ("better", "worse"):
            return verdict
        equivalence = self.equivalence
        if equivalence is None:
            return undetectable(self.count, self.clips)
        low, high = equivalence.interval
        if equivalence.equivalent:
            return f"the effect lies within ±{fmt(self.margin or 0.0, 3)} (TOST at {self.alpha:.0%})"
        return (
            f"undecided: the interval [{fmt_signed(low)}, {fmt_signed(high)}] still allows an effect larger than "
            f"the margin ±{fmt(self.margin or 0.0, 3)}"
        )

    def sentence(self, labels: Mapping[str, str] | None = None) -> str:
        """One sentence with the verdict and the numbers behind it."""
        labels = labels or {}
        candidate, baseline = (labels.get(name, name) for name in (self.candidate, self.baseline))
        head = (
            f"{candidate} vs {baseline}, {self.metric.title} ({self.metric.direction} is better): "
            f"{self.verdict_phrase()}"
        )
        if self.count == 0:
            return f"{head}: no seed was measured for both."
        if self.count == 1:
            return (
                f"{head}: the one seed gives a difference of {fmt_signed(self.mean)} but no confidence "
                f"interval (a paired interval needs 2 seeds or more); {self.power_sentence()}."
            )
        low, high = self.interval  # type: ignore[misc]
        corrected = ""
        if self.family:
            corrected = (
                f", {CORRECTION_TITLES[self.correction]}-adjusted {'q' if self.family == 'exploratory' else 'p'} = "
                f"{fmt(self.p_adjusted if self.p_adjusted is not None else math.nan, 2)} over the "
                f"{self.family_size} {self.family} tests"
            )
        numbers = (
            f"mean paired difference {fmt_signed(self.mean)}, {self.confidence:.0%} CI "
            f"[{fmt_signed(low)}, {fmt_signed(high)}] (paired t over {self.count} seeds, "
            f"p = {fmt(self.p_value or 0.0, 2)}{corrected})"
        )
        return f"{head}: {numbers}; {self.power_sentence()}."


def compare_pair(
    metric: MetricSpec,
    candidate: str,
    baseline: str,
    values: Mapping[str, Mapping[int, float | None]],
    clips: int,
    confidence: float = CONFIDENCE,
    power: float = POWER,
) -> PairedComparison:
    """Pair ``values[candidate]`` and ``values[baseline]`` ({seed: value}) at the seeds where both
    are finite numbers."""
    first, second = values.get(candidate, {}), values.get(baseline, {})
    seeds = tuple(sorted(s for s in first if _finite(first[s]) and _finite(second.get(s))))
    differences = tuple(float(first[s]) - float(second[s]) for s in seeds)  # type: ignore[arg-type]
    return PairedComparison(metric, candidate, baseline, seeds, differences, clips, confidence, power)


def pairs_in_order(variants: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair (later, earlier) in the order the variants were given: with none, repa, crepa that is
    repa vs none, crepa vs none, crepa vs repa (the earlier variant is the baseline)."""
    return [(later, earlier) for j, later in enumerate(variants) for earlier in variants[:j]]


def compare_all(
    metrics: Sequence[MetricSpec],
    variants: Sequence[str],
    values: Mapping[str, Mapping[str, Mapping[int, float | None]]],
    clips: int,
    confidence: float = CONFIDENCE,
    power: float = POWER,
) -> list[PairedComparison]:
    """Every judged metric (direction not None) x every pair of :func:`pairs_in_order`;
    ``values[metric][variant][seed]``."""
    return [
        compare_pair(metric, candidate, baseline, values.get(metric.key, {}), clips, confidence, power)
        for metric in metrics
        if metric.higher_is_better is not None
        for candidate, baseline in pairs_in_order(variants)
    ]


# ---------------------------------------------------------------- the analysis plan and the families
# The paper's own claims: the headline questions unless --primary (or experiment.primary) says otherwise.
DEFAULT_PRIMARY = ("subject_consistency", "temporal_flickering", "warping_error", "frechet_distance")
# Measures of the trained representation itself (alignment trains them directly): reported, never headlined.
DIAGNOSTIC_METRICS = ("cknna",)
# Metrics that a still clip maximises: also compared at matched motion.
CONSISTENCY_METRICS = ("subject_consistency", "temporal_flickering", "warping_error")
MOTION_METRIC = "flow_magnitude"
# Equivalence margins (metric units, override with --margin METRIC=VALUE): the smallest paired difference
# that would matter. Subject consistency and flicker are in [0, 1] (0.002 = half a grey level of 255 in
# flicker); warping error is a mean squared error of [0, 1] pixels. The Frechet distance has no default:
# its scale depends on the feature extractor.
DEFAULT_MARGINS: dict[str, float] = {
    "subject_consistency": 0.002,
    "background_consistency": 0.002,
    "temporal_flickering": 0.002,
    "warping_error": 0.0005,
}


@dataclass(frozen=True)
class AnalysisPlan:
    """What the verdict is about, fixed before any result: the primary metrics (the headline, Holm over
    pairs x primary metrics at family-wise ``alpha``), the equivalence margins, and the rest exploratory
    (Benjamini-Hochberg q-values)."""

    primary: tuple[str, ...]
    margins: Mapping[str, float]
    alpha: float = ALPHA

    def record(self) -> dict[str, Any]:
        return {
            "primary": list(self.primary),
            "margins": dict(self.margins),
            "alpha": self.alpha,
            "primary_correction": CORRECTIONS["primary"],
            "exploratory_correction": CORRECTIONS["exploratory"],
            "equivalence": f"TOST at {self.alpha:g} (the {1 - 2 * self.alpha:.0%} interval inside ±margin)",
            "motion_adjusted_metrics": list(CONSISTENCY_METRICS),
        }


def resolve_plan(
    metrics: Sequence[MetricSpec],
    primary: Sequence[str] | None = None,
    margins: Mapping[str, float] | None = None,
) -> AnalysisPlan:
    """The plan for ``metrics``: ``primary`` (default: those of :data:`DEFAULT_PRIMARY` measured) and
    :data:`DEFAULT_MARGINS` updated by ``margins``. Raises ValueError naming a metric that is not judged,
    a diagnostic named as primary, or a margin that is not positive."""
    judged = [m.key for m in metrics if m.higher_is_better is not None]
    chosen = tuple(key for key in DEFAULT_PRIMARY if key in judged) if primary is None else tuple(primary)
    for key in chosen:
        if key in DIAGNOSTIC_METRICS:
            raise ValueError(
                f"--primary {key}: a diagnostic of the trained representation (alignment trains it directly); "
                "it is reported but cannot be a headline metric"
            )
        if key not in judged:
            raise ValueError(
                f"--primary {key}: not a judged metric of this experiment; choose from {', '.join(judged)}"
            )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--primary: a metric is named twice in {','.join(chosen)}")
    given = dict(margins or {})
    for key, value in given.items():
        if key not in judged:
            raise ValueError(
                f"--margin {key}={value}: not a judged metric of this experiment; choose from {', '.join(judged)}"
            )
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--margin {key}={value}: the margin must be a positive number (metric units)")
    merged = {key: value for key, value in DEFAULT_MARGINS.items() if key in judged} | given
    return AnalysisPlan(chosen, {key: merged[key] for key in judged if key in merged})


def motion_adjusted_values(
    per_clip: Mapping[str, Mapping[int, tuple[Sequence[float], Sequence[float]] | None]],
) -> dict[str, dict[int, float | None]]:
    """{variant: {seed: (metric (M,), flow (M,)) per clip}} -> {variant: {seed: mean residual}}: the
    metric regressed on flow magnitude over every finite clip of every variant and seed (one line), each
    run then summarised by the mean residual of its clips (None for a run without finite clips)."""
    runs = []
    for variant, seeds in per_clip.items():
        for seed, pair in seeds.items():
            if pair is not None:
                values, flow = (np.asarray(part, dtype=np.float64) for part in pair)
                finite = np.isfinite(values) & np.isfinite(flow)
                runs.append((variant, seed, values[finite], flow[finite]))
    means: dict[str, dict[int, float | None]] = {variant: {} for variant in per_clip}
    if not runs:
        return means
    values = np.concatenate([values for _, _, values, _ in runs])
    flow = np.concatenate([flow for _, _, _, flow in runs])
    sizes = np.cumsum([values.size for _, _, values, _ in runs])[:-1]
    for (variant, seed, _, _), part in zip(
        runs, np.split(motion_residuals(values, flow)[0], sizes), strict=True
    ):
        means[variant][seed] = float(part.mean()) if part.size else None
    return means


def judge(
    comparisons: Sequence[PairedComparison],
    plan: AnalysisPlan,
    motion: Mapping[tuple[str, str, str], PairedComparison] | None = None,
) -> list[PairedComparison]:
    """The comparisons placed in their families: primary metrics with Holm-adjusted p over every primary
    comparison that has a test (two seeds or more), the others with BH q-values over theirs; each with its
    metric's margin and, where ``motion`` has it ((metric, candidate, baseline) -> the comparison of the
    motion-adjusted values), the motion-adjusted comparison, corrected in the same family (its p taking
    the place of the unadjusted one)."""
    motion = motion or {}
    judged = [
        replace(
            c,
            family="primary" if c.metric.key in plan.primary else "exploratory",
            margin=plan.margins.get(c.metric.key),
        )
        for c in comparisons
    ]
    adjusted: dict[int, float] = {}
    adjusted_motion: dict[int, float] = {}
    for family, correct in (("primary", holm_adjusted), ("exploratory", benjamini_hochberg)):
        members = [i for i, c in enumerate(judged) if c.family == family and c.p_value is not None]
        raw = np.array([judged[i].p_value for i in members], dtype=np.float64)
        adjusted.update(zip(members, correct(raw).tolist(), strict=True))
        moved = [motion.get((judged[i].metric.key, judged[i].candidate, judged[i].baseline)) for i in members]
        swapped = np.array(
            [
                m.p_value if m is not None and m.p_value is not None else p
                for m, p in zip(moved, raw, strict=True)
            ]
        )
        adjusted_motion.update(zip(members, correct(swapped).tolist(), strict=True))
        for i in members:
            judged[i] = replace(judged[i], family_size=len(members))
    result = []
    for i, c in enumerate(judged):
        moved = motion.get((c.metric.key, c.candidate, c.baseline))
        if moved is not None and moved.p_value is not None and i in adjusted_motion:
            moved = replace(moved, family=c.family, family_size=c.family_size, p_adjusted=adjusted_motion[i])
        result.append(replace(c, p_adjusted=adjusted.get(i), motion=moved))
    return result


# ---------------------------------------------------------------- sentences and tables
def questions_sentence(comparisons: Sequence[PairedComparison], plan: AnalysisPlan) -> str:
    """How many questions the verdict asked and how it corrected for them."""
    primary = [c for c in comparisons if c.family == "primary" and c.p_value is not None]
    exploratory = [c for c in comparisons if c.family == "exploratory" and c.p_value is not None]
    pairs = len({(c.candidate, c.baseline) for c in comparisons})
    titles = list(dict.fromkeys(c.metric.title for c in comparisons if c.family == "primary"))
    if not primary:
        head = "No primary metric was declared (or none could be tested), so no headline question was asked"
    else:
        head = (
            f"{len(primary)} headline questions were asked ({_plural(pairs, 'pair')} x {len(titles)} primary metrics, "
            f"declared before the run: {join_names(titles)}); a difference is called better or worse only when "
            f"it survives Holm-Bonferroni over all {len(primary)} at a family-wise error of {plan.alpha:.0%}"
        )
    motion = (
        " Consistency metrics are also compared at matched motion (regressed on flow magnitude); a gain that "
        "does not survive that is explained by less motion."
        if any(c.motion is not None for c in comparisons)
        else ""
    )
    return (
        f"{head}. The other {len(exploratory)} comparisons are exploratory: each carries a Benjamini-Hochberg "
        "q-value, and none is called an effect. Where nothing is detected, a metric with a margin gets an "
        f"equivalence test (TOST at {plan.alpha:.0%}): the effect lies within ±margin when the "
        f"{1 - 2 * plan.alpha:.0%} interval does, undecided otherwise." + motion
    )


def summary_sentences(
    comparisons: Sequence[PairedComparison], labels: Mapping[str, str] | None = None
) -> list[str]:
    """Per pair of variants: on which headline metrics the candidate is better, worse, explained by
    motion, or not told apart (with the equivalence outcome); exploratory comparisons never count."""
    labels = labels or {}
    pairs = list(dict.fromkeys((c.candidate, c.baseline) for c in comparisons))
    sentences = []
    for candidate, baseline in pairs:
        these = [c for c in comparisons if (c.candidate, c.baseline) == (candidate, baseline)]
        headline = [c for c in these if c.family != "exploratory"]
        if not headline:
            continue
        names = {v: [c.metric.title for c in headline if c.verdict == v] for v in ("better", "worse")}
        explained = [f"{c.metric.title} {c.verdict}" for c in headline if c.explained_by_motion]
        undetected = [c for c in headline if c.outcome == "no difference"]
        leads = [c for c in these if c.family == "exploratory" and c.outcome != "no difference"]
        name, other = labels.get(candidate, candidate), labels.get(baseline, baseline)
        if not names["better"] and not names["worse"] and not explained:
            fewest = min(c.count for c in headline)
            scope = "on any primary metric" if leads else "on any metric"
            sentence = f"{name} vs {other}: {undetectable(fewest, headline[0].clips)} {scope}"
        else:
            sentence = f"{name} vs {other}: "
            if names["better"] or names["worse"]:
                sentence += f"better on {join_names(names['better'])}, worse on {join_names(names['worse'])}"
            if explained:
                sentence += (", " if names["better"] or names["worse"] else "") + join_names(explained)
            if undetected:
                sentence += (
                    f", no difference detectable on {join_names([c.metric.title for c in undetected])}"
                )
        within = [c.metric.title for c in undetected if c.verdict == "within margin"]
        undecided = [c.metric.title for c in undetected if c.verdict == "undecided"]
        if within:
            sentence += f"; the effect lies within the margin on {join_names(within)} (TOST)"
        if undecided:
            sentence += f"; undecided on {join_names(undecided)} (the interval still allows an effect larger than the margin)"
        sentences.append(sentence + ".")
    return sentences


def exploratory_sentence(
    comparisons: Sequence[PairedComparison], labels: Mapping[str, str] | None = None
) -> str:
    """The exploratory comparisons with a raw p below alpha, each with its q-value: leads, not effects."""
    labels = labels or {}
    found = [
        c for c in comparisons if c.family == "exploratory" and c.p_value is not None and c.p_value < c.alpha
    ]
    if not found:
        return "Exploratory: no comparison outside the primary metrics reaches p < 5% even before correction."
    items = [
        f"{c.metric.title} {'higher' if c.mean > 0 else 'lower'} for {labels.get(c.candidate, c.candidate)} than "
        f"{labels.get(c.baseline, c.baseline)} (p = {fmt(c.p_value or 0.0, 2)}, q = {fmt(c.p_adjusted or 0.0, 2)})"
        for c in found
    ]
    return (
        "Exploratory (outside the primary metrics; leads for a new experiment, not effects): "
        + "; ".join(items)
        + "."
    )


def comparison_table(
    comparisons: Sequence[PairedComparison], labels: Mapping[str, str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per comparison with the numbers behind its verdict (raw p, adjusted p
    and the correction, the motion-adjusted p where there is one)."""
    labels = labels or {}
    rows = []
    for c in comparisons:
        interval = c.interval
        needed = c.seeds_needed
        moved = c.motion
        rows.append(
            [
                f"{labels.get(c.candidate, c.candidate)} vs {labels.get(c.baseline, c.baseline)}",
                f"{c.metric.title} ({'↑' if c.metric.higher_is_better else '↓'})",
                fmt_signed(c.mean) if c.count else "-",
                "-" if interval is None else f"[{fmt_signed(interval[0])}, {fmt_signed(interval[1])}]",
                "-" if c.p_value is None else fmt(c.p_value, 2),
                "-" if c.p_adjusted is None else fmt(c.p_adjusted, 2),
                CORRECTION_TITLES[c.correction] if c.family else "none",
                "-" if moved is None or moved.p_adjusted is None else fmt(moved.p_adjusted, 2),
                c.verdict_phrase(),
                "-" if needed is None else str(needed),
            ]
        )
    confidence = f"{comparisons[0].confidence:.0%}" if comparisons else f"{CONFIDENCE:.0%}"
    header = [
        "pair",
        "metric",
        "mean paired diff.",
        f"{confidence} CI",
        "p",
        "adjusted p",
        "correction",
        "adjusted p at matched motion",
        "verdict",
        "seeds needed",
    ]
    return header, rows


def ranking_sentence(
    metric: MetricSpec, aggregates: Mapping[str, Aggregate], labels: Mapping[str, str] | None = None
) -> str:
    """The variants on one judged metric, best mean first, as mean ± std over seeds."""
    labels = labels or {}
    order = sorted(aggregates, key=lambda v: aggregates[v].mean, reverse=bool(metric.higher_is_better))
    ranking = "; ".join(f"{labels.get(v, v)} {aggregates[v].text()}" for v in order)
    title = metric.title[:1].upper() + metric.title[1:]
    return f"{title} ({metric.direction} is better, mean ± std): {ranking}."


def method_sentence(seeds: int, clips: int, confidence: float = CONFIDENCE, power: float = POWER) -> str:
    """The statistics in one sentence, for the report."""
    if seeds < 2:
        return (
            f"With one seed per variant ({_plural(clips, 'clip')} each) there is one paired difference per "
            "metric and no estimate of its spread: no difference can be told apart from seed noise. Run "
            "with --seeds 2 or more for a verdict."
        )
    return (
        f"Variants share batches, noise and timesteps at each seed, so each pair of variants is compared "
        f"through its per-seed differences ({seeds} seeds, each the mean over {_plural(clips, 'clip')}): "
        f"mean paired difference with a {confidence:.0%} Student t confidence interval; a difference is "
        f"tested with the paired t-test, then corrected for the number of questions (below). Seeds needed: "
        f"the smallest number of seeds at which that test, at the corrected level ({1 - confidence:.0%} / the "
        f"number of tests in its family), has {power:.0%} power for the observed effect size (noncentral t)."
    )


# ---------------------------------------------------------------- formatting
def fmt(value: float, digits: int = 4) -> str:
    """``digits`` significant digits; "n/a" for NaN or infinity."""
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"


def fmt_signed(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.{digits}g}"


def join_names(names: Sequence[str]) -> str:
    """Names as prose: no metric, a, a and b, a, b and c."""
    if not names:
        return "no metric"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def undetectable(seeds: int, clips: int) -> str:
    return f"no difference detectable with {_plural(seeds, 'seed')} and {_plural(clips, 'clip')}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _finite(value: float | None) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
