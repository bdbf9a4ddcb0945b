"""Paired statistics of an experiment and the verdict they support (pure numbers, no I/O).

At a given seed every variant of an experiment sees the same batches, noise and timesteps, and is
sampled from the same noise; what differs between two variants at one seed is the variant. So two
variants are compared through their per-seed differences d_s = candidate_s - baseline_s (each value
already a mean over the M evaluated clips of that run), not through their separate spreads:

- the estimate is the mean paired difference with a two-sided Student t confidence interval,
  mean(d) ± t_{1-a/2, n-1} * sd(d) / sqrt(n) (sd with ddof 1); the difference is "detected" when the
  interval excludes 0, which is the paired t-test at level a (default 95 % / 5 %). No correction for
  testing several metrics and pairs: with many of them, expect about one false "better"/"worse" in 20
  true nulls.
- the seeds needed to detect the observed difference: the smallest n >= 2 at which the two-sided paired
  t-test at level a reaches the target power (default 80 %) for the observed standardised effect
  |mean(d)| / sd(d), from the noncentral t distribution (the exact power of the t-test, not the normal
  approximation).
- one seed gives one difference and no estimate of its spread: no interval, no test, no power, and the
  verdict says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

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
        return _sd(np.asarray(self.values, dtype=np.float64)) if len(self.values) > 1 else 0.0

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
    half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1)) * _sd(values) / math.sqrt(values.size)
    return mean - half, mean + half


def paired_p_value(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test (H0: mean difference 0); None with fewer than two values.
    Zero spread gives 0 for a non-zero mean and 1 for a zero mean."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size < 2:
        return None
    sd, mean = _sd(values), float(values.mean())
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    statistic = mean / (sd / math.sqrt(values.size))
    return float(2 * stats.t.sf(abs(statistic), values.size - 1))


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


@dataclass(frozen=True)
class PairedComparison:
    """``candidate`` against ``baseline`` on one metric, over the seeds both were measured at.

    ``differences`` are candidate - baseline per seed, in the metric's units; ``clips`` is the number
    of clips each run was evaluated on."""

    metric: MetricSpec
    candidate: str
    baseline: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    clips: int
    confidence: float = CONFIDENCE
    power: float = POWER

    @property
    def count(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences)) if self.differences else math.nan

    @property
    def sd(self) -> float | None:
        """Standard deviation of the paired differences (ddof 1); None with fewer than two seeds."""
        return _sd(np.asarray(self.differences, dtype=np.float64)) if self.count > 1 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return t_interval(self.differences, self.confidence)

    @property
    def p_value(self) -> float | None:
        return paired_p_value(self.differences)

    @property
    def outcome(self) -> Outcome:
        """Better or worse when the interval excludes 0 (on the candidate's good / bad side)."""
        interval = self.interval
        if interval is None or self.metric.higher_is_better is None:
            return "no difference"
        low, high = interval
        if low > 0 or high < 0:
            return "better" if (low > 0) == self.metric.higher_is_better else "worse"
        return "no difference"

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
    def seeds_needed(self) -> int | None:
        """Seeds for the paired t-test to detect the observed difference with :attr:`power`; None when
        unknown (one seed, a zero difference, or more than :data:`MAX_SEEDS`)."""
        effect = self.effect
        return None if effect is None else seeds_for_power(effect, self.power, 1 - self.confidence)

    def record(self) -> dict[str, Any]:
        """Everything about this comparison as plain JSON values."""
        interval = self.interval
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
            "outcome": self.outcome,
            "verdict": self.verdict_phrase(),
            "seeds_needed": self.seeds_needed,
            "power": self.power,
            "sentence": self.sentence(),
        }

    def power_sentence(self) -> str:
        """How many seeds the observed difference needs, or why that is unknown."""
        effect = self.effect
        if effect is None:
            return "one seed gives no spread, so the seeds needed to detect it are unknown"
        if effect == 0.0:
            return "the paired differences are all zero"
        needed = self.seeds_needed
        method = (
            f"for {self.power:.0%} power of a two-sided paired t-test at "
            f"{1 - self.confidence:.0%} (noncentral t), effect size {effect:.2g}"
        )
        if needed is None:
            return f"detecting a difference this size would need more than {MAX_SEEDS} seeds ({method})"
        return f"detecting a difference this size needs {needed} seeds ({method})"

    def verdict_phrase(self) -> str:
        """The verdict: better, worse, or no difference detectable with N seeds and M clips."""
        if self.outcome != "no difference":
            return self.outcome
        return undetectable(self.count, self.clips)

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
        numbers = (
            f"mean paired difference {fmt_signed(self.mean)}, {self.confidence:.0%} CI "
            f"[{fmt_signed(low)}, {fmt_signed(high)}] (paired t over {self.count} seeds, "
            f"p = {fmt(self.p_value or 0.0, 2)})"
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


def summary_sentences(
    comparisons: Sequence[PairedComparison], labels: Mapping[str, str] | None = None
) -> list[str]:
    """Per pair of variants: on which metrics the candidate is better, worse, or not told apart."""
    labels = labels or {}
    pairs = list(dict.fromkeys((c.candidate, c.baseline) for c in comparisons))
    sentences = []
    for candidate, baseline in pairs:
        these = [c for c in comparisons if (c.candidate, c.baseline) == (candidate, baseline)]
        if not these:
            continue
        by_outcome = {o: [c.metric.title for c in these if c.outcome == o] for o in ("better", "worse")}
        undetected = [c for c in these if c.outcome == "no difference"]
        name, other = labels.get(candidate, candidate), labels.get(baseline, baseline)
        if not by_outcome["better"] and not by_outcome["worse"]:
            fewest = min(c.count for c in these)
            sentence = f"{name} vs {other}: {undetectable(fewest, these[0].clips)} on any metric."
        else:
            sentence = (
                f"{name} vs {other}: better on {join_names(by_outcome['better'])}, worse on "
                f"{join_names(by_outcome['worse'])}"
            )
            if undetected:
                sentence += (
                    f", no difference detectable on {join_names([c.metric.title for c in undetected])}"
                )
            sentence += "."
        sentences.append(sentence)
    return sentences


def comparison_table(
    comparisons: Sequence[PairedComparison], labels: Mapping[str, str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per comparison with the numbers behind its verdict."""
    labels = labels or {}
    rows = []
    for c in comparisons:
        interval = c.interval
        needed = c.seeds_needed
        rows.append(
            [
                f"{labels.get(c.candidate, c.candidate)} vs {labels.get(c.baseline, c.baseline)}",
                f"{c.metric.title} ({'↑' if c.metric.higher_is_better else '↓'})",
                fmt_signed(c.mean) if c.count else "-",
                "-" if interval is None else f"[{fmt_signed(interval[0])}, {fmt_signed(interval[1])}]",
                "-" if c.p_value is None else fmt(c.p_value, 2),
                c.verdict_phrase(),
                "-" if needed is None else str(needed),
            ]
        )
    confidence = f"{comparisons[0].confidence:.0%}" if comparisons else f"{CONFIDENCE:.0%}"
    header = ["pair", "metric", "mean paired diff.", f"{confidence} CI", "p", "verdict", "seeds needed"]
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
        f"called better or worse when the interval excludes 0 (the paired t-test at {1 - confidence:.0%}, "
        f"no correction for the number of metrics and pairs). Seeds needed: the smallest number of seeds at "
        f"which that test has {power:.0%} power for the observed effect size (noncentral t)."
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


def _sd(values: np.ndarray) -> float:
    """Sample standard deviation (ddof 1), exactly 0 for equal values (not a rounding residue)."""
    if values.min() == values.max():
        return 0.0
    return float(values.std(ddof=1))


def _finite(value: float | None) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
