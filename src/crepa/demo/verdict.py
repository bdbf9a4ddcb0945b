"""From the numbers to the verdict: mean and spread over seeds, which variant leads on which
metric, and whether the lead is larger than the seed spread. Every sentence is assembled from the
measured values; none states a conclusion that the numbers did not produce.

The rule: a difference between two variants counts when |difference of means| exceeds the sum of
their standard deviations over seeds (their mean +- std intervals do not overlap). With one seed
there is no spread, and no difference counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crepa.demo.experiment import VARIANT_LABELS

# Quality metrics and which direction is better; the motion measures give context, not quality.
QUALITY_METRICS: dict[str, str] = {
    "subject_consistency": "higher",
    "temporal_flickering": "higher",
    "warping_error": "lower",
    "frechet_distance": "lower",
    "cknna": "higher",
}
CONSISTENCY_METRICS = ("subject_consistency", "temporal_flickering", "warping_error")
MOTION_METRICS = ("dynamic_degree", "flow_magnitude")
TABLE_METRICS = (*QUALITY_METRICS, *MOTION_METRICS)
METRIC_TITLES = {
    "subject_consistency": "subject consistency",
    "temporal_flickering": "temporal flickering",
    "warping_error": "warping error",
    "frechet_distance": "Frechet distance",
    "cknna": "CKNNA",
    "dynamic_degree": "dynamic degree",
    "flow_magnitude": "flow magnitude",
}


@dataclass(frozen=True)
class Aggregate:
    """One metric of one variant over seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof 1); 0 for a single value."""
        count = len(self.values)
        if count < 2 or min(self.values) == max(self.values):
            return 0.0  # exactly, not the rounding residue of equal values
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (count - 1))


def metric_value(metrics: Mapping[str, Mapping[str, Any]], row: str, metric: str) -> float | None:
    """The value of ``metric`` in row ``row`` of the evaluation, None when absent or not finite."""
    entry = metrics.get(row, {}).get(metric)
    value = entry.get("value") if isinstance(entry, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def aggregate(metrics: Mapping[str, Mapping[str, Any]], prefix: str, seeds: int) -> dict[str, Aggregate]:
    """Every table metric of rows ``<prefix>-seed0`` .. ``<prefix>-seed{seeds - 1}``."""
    result = {}
    for metric in TABLE_METRICS:
        values = [metric_value(metrics, f"{prefix}-seed{seed}", metric) for seed in range(seeds)]
        result[metric] = Aggregate(tuple(v for v in values if v is not None))
    return result


def fmt(value: float, digits: int = 4) -> str:
    """``digits`` significant digits; "n/a" for NaN or infinity."""
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"


def fmt_aggregate(entry: Aggregate) -> str:
    """Mean (4 significant digits) ± std (2), or the one value."""
    return f"{fmt(entry.mean)} ± {fmt(entry.std, 2)}" if len(entry.values) > 1 else fmt(entry.mean)


def sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Comparison:
    """The variants on one quality metric, best first."""

    metric: str
    direction: str
    order: tuple[str, ...]
    entries: dict[str, Aggregate]

    def advantage(self, first: str, second: str) -> float:
        """How much better ``first`` is than ``second`` (negative: worse), in the metric's units."""
        difference = self.entries[first].mean - self.entries[second].mean
        return difference if self.direction == "higher" else -difference

    def spread(self, first: str, second: str) -> float:
        return self.entries[first].std + self.entries[second].std

    def clearly_better(self, first: str, second: str) -> bool:
        """``first`` beats ``second`` by more than their seed spread (needs two seeds or more)."""
        enough = min(len(self.entries[first].values), len(self.entries[second].values)) > 1
        return enough and self.advantage(first, second) > self.spread(first, second)


def compare(variants: Mapping[str, Mapping[str, Aggregate]]) -> list[Comparison]:
    """One :class:`Comparison` per quality metric measured for every variant."""
    comparisons = []
    for metric, direction in QUALITY_METRICS.items():
        entries = {variant: variants[variant][metric] for variant in variants}
        if any(not entry.values for entry in entries.values()):
            continue
        order = sorted(entries, key=lambda v: entries[v].mean, reverse=direction == "higher")
        comparisons.append(Comparison(metric, direction, tuple(order), entries))
    return comparisons


def _names(metrics: list[str]) -> str:
    titles = [METRIC_TITLES[m] for m in metrics]
    if not titles:
        return "no metric"
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " and " + titles[-1]


def metric_sentence(comparison: Comparison) -> str:
    """Ranking on one metric and whether the leader's lead exceeds the seed spread."""
    label = VARIANT_LABELS
    ranking = "; ".join(f"{label[v]} {fmt_aggregate(comparison.entries[v])}" for v in comparison.order)
    head = f"{sentence_case(METRIC_TITLES[comparison.metric])} ({comparison.direction} is better): {ranking}."
    best, runner_up = comparison.order[0], comparison.order[1]
    lead, spread = comparison.advantage(best, runner_up), comparison.spread(best, runner_up)
    if min(len(comparison.entries[v].values) for v in (best, runner_up)) < 2:
        return f"{head} {label[best]} leads by {fmt(lead, 3)}; with one seed there is no spread to compare it with."
    judgement = "larger than" if comparison.clearly_better(best, runner_up) else "within"
    return (
        f"{head} {label[best]} leads {label[runner_up]} by {fmt(lead, 3)}, {judgement} the seed spread "
        f"({fmt(spread, 3)})."
    )


def head_to_head(comparisons: list[Comparison], first: str, second: str) -> tuple[list[str], list[str]]:
    """Metrics where ``first`` is clearly better than ``second``, and where it is clearly worse."""
    better = [c.metric for c in comparisons if c.clearly_better(first, second)]
    worse = [c.metric for c in comparisons if c.clearly_better(second, first)]
    return better, worse


def summary_sentences(comparisons: list[Comparison], seeds: int) -> list[str]:
    """Each pair of variants head to head, then what the separations say about alignment in general
    (REPA* or CREPA against none) and about CREPA's cross-frame term (CREPA against REPA*)."""
    label = VARIANT_LABELS
    if seeds < 2:
        return [
            "With a single seed there is no seed spread, so no difference below can be told apart from "
            "noise; run with --seeds 2 or more for a verdict."
        ]
    sentences = [
        f"Counting only differences larger than the seed spread (|difference of means| above the sum of "
        f"the two standard deviations over {seeds} seeds):"
    ]
    for first, second in (("crepa", "none"), ("crepa", "repa"), ("repa", "none")):
        better, worse = head_to_head(comparisons, first, second)
        sentences.append(
            f"{label[first]} is better than {label[second]} on {_names(better)} and worse on {_names(worse)}."
        )
    separated = [c for c in comparisons if any(c.clearly_better(a, b) for a in c.order for b in c.order)]
    if not separated:
        sentences.append(
            "No variant separates from another beyond the seed spread on any metric: at this scale the "
            "differences in the table are within seed noise, and this run shows no effect of alignment or "
            "of CREPA's cross-frame term."
        )
        return sentences
    aligned = sorted(
        {m for variant in ("repa", "crepa") for m in head_to_head(comparisons, variant, "none")[0]},
        key=list(QUALITY_METRICS).index,
    )
    if aligned:
        sample_metrics = [m for m in aligned if m != "cknna"]
        sentences.append(
            f"Alignment (REPA* or CREPA) beats no alignment beyond the seed spread on {_names(aligned)}"
            + (
                ": the block's representation moved towards the teacher, but no measure of the generated "
                "clips separates beyond noise."
                if not sample_metrics
                else "."
            )
        )
    else:
        sentences.append("Neither aligned variant beats no alignment beyond the seed spread on any metric.")
    better, worse = head_to_head(comparisons, "crepa", "repa")
    if not better and not worse:
        sentences.append(
            "The cross-frame term itself (CREPA against REPA*, which differ only in it) shows no effect "
            "beyond the seed spread on any metric."
        )
    else:
        sentences.append(
            f"The cross-frame term itself (CREPA against REPA*, which differ only in it) helps on "
            f"{_names(better)} and hurts on {_names(worse)} beyond the seed spread."
        )
    return sentences


def motion_caveats(
    comparisons: list[Comparison], variants: Mapping[str, Mapping[str, Aggregate]]
) -> list[str]:
    """A consistency leader that also moves clearly less than a variant it beats gets a caveat: a
    frozen clip maximises every consistency score."""
    sentences = []
    flow = {variant: entries["flow_magnitude"] for variant, entries in variants.items()}
    for comparison in comparisons:
        if comparison.metric not in CONSISTENCY_METRICS:
            continue
        best = comparison.order[0]
        for other in comparison.order[1:]:
            slower = flow[other].mean - flow[best].mean > flow[other].std + flow[best].std
            if comparison.clearly_better(best, other) and slower and len(flow[best].values) > 1:
                sentences.append(
                    f"{VARIANT_LABELS[best]}'s lead on {METRIC_TITLES[comparison.metric]} over "
                    f"{VARIANT_LABELS[other]} comes with clearly less motion (flow magnitude "
                    f"{fmt_aggregate(flow[best])} vs {fmt_aggregate(flow[other])} px per frame); less motion "
                    "raises consistency scores by itself."
                )
    return sentences


def context_sentences(
    variants: Mapping[str, Mapping[str, Aggregate]],
    base: Mapping[str, Aggregate],
    references: Mapping[str, Mapping[str, float | None]],
) -> list[str]:
    """What fine-tuning changed against the base model, and the ceiling set by the VAE."""
    sentences = []
    distances = [variants[v]["frechet_distance"].mean for v in variants]
    if base["frechet_distance"].values and all(math.isfinite(d) for d in distances):
        sentences.append(
            f"Fine-tuning moved the Frechet distance to the held-out clips from {fmt(base['frechet_distance'].mean)} "
            f"(base model) to between {fmt(min(distances))} and {fmt(max(distances))} (the three variants)."
        )
    recon = references.get("reconstruction", {})
    real = references.get("real", {})
    if recon.get("subject_consistency") is not None and real.get("subject_consistency") is not None:
        sentences.append(
            f"The held-out clips themselves score subject consistency {fmt(real['subject_consistency'])}; "
            f"through the VAE alone (no diffusion model) {fmt(recon['subject_consistency'])} with Frechet "
            f"distance {fmt(recon.get('frechet_distance') or math.nan)}: the ceiling of this latent space."
        )
    return sentences


def verdict(
    variants: Mapping[str, Mapping[str, Aggregate]],
    base: Mapping[str, Aggregate],
    references: Mapping[str, Mapping[str, float | None]],
    seeds: int,
) -> dict[str, list[str]]:
    """The verdict as paragraphs: per-metric rankings, the head-to-head summary, caveats, context."""
    comparisons = compare(variants)
    return {
        "metrics": [metric_sentence(c) for c in comparisons],
        "summary": summary_sentences(comparisons, seeds),
        "caveats": motion_caveats(comparisons, variants),
        "context": context_sentences(variants, base, references),
    }
