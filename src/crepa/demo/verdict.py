"""From the demo's numbers to its verdict, with the paired statistics of :mod:`crepa.experiment.verdict`:
at each seed the three variants share batches, noise and timesteps and sample from the same noise, so
each pair is judged on its per-seed differences, corrected for the number of questions (Holm over the
primary metrics, BH q-values for the rest). On top of the generic per-pair sentences, the demo says
what the corrected verdicts mean for alignment in general (REPA* or CREPA against none) and for CREPA's
cross-frame term (CREPA against REPA*, which differ only in it), whether consistency gains survive the
motion adjustment, what CKNNA is (a diagnostic), and gives the base model and VAE ceiling as context.
Every sentence is assembled from the measured values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from crepa.demo.evaluate import WORLD_METRICS
from crepa.experiment.report import Block, aggregates, seed_values
from crepa.experiment.runfiles import VARIANT_LABELS
from crepa.experiment.runner import ExperimentResults
from crepa.experiment.verdict import (
    DIAGNOSTIC_METRICS,
    Aggregate,
    MetricSpec,
    PairedComparison,
    compare_pair,
    fmt,
    fmt_signed,
    join_names,
)

VARIANTS = ("none", "repa", "crepa")
# Quality metrics and which direction is better; the motion measures give context, not quality.
QUALITY_METRICS: dict[str, str] = {
    "subject_consistency": "higher",
    "temporal_flickering": "higher",
    "warping_error": "lower",
    "frechet_distance": "lower",
    "cknna": "higher",
    **dict.fromkeys(WORLD_METRICS, "higher"),  # the world-aware metrics (crepa.demo.evaluate)
}
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
    "colour_accuracy": "colour accuracy",
    "shape_accuracy": "shape accuracy",
    "texture_accuracy": "texture accuracy",
    "identity_persistence": "identity persistence",
    "count_stability": "count stability",
    "motion_correctness": "motion correctness",
}
SHORT_TITLES = {
    "subject_consistency": "subject",
    "temporal_flickering": "flicker",
    "warping_error": "warp err",
    "frechet_distance": "FD",
    "cknna": "CKNNA",
    "dynamic_degree": "dyn. deg",
    "flow_magnitude": "flow px",
    "colour_accuracy": "colour",
    "shape_accuracy": "shape",
    "texture_accuracy": "texture",
    "identity_persistence": "identity",
    "count_stability": "count",
    "motion_correctness": "motion ok",
}
METRICS = tuple(
    MetricSpec(
        key,
        METRIC_TITLES[key],
        {"higher": True, "lower": False}.get(QUALITY_METRICS.get(key, "")),
        SHORT_TITLES[key],
    )
    for key in TABLE_METRICS
)
# The terminal's table: the columns that fit 80 characters (the report has every metric).
TERMINAL_METRICS = ("subject_consistency", "frechet_distance", "identity_persistence", "motion_correctness")
MORE_MOTION = MetricSpec("flow_magnitude", "flow magnitude", higher_is_better=True)


def _verdicts(
    comparisons: Sequence[PairedComparison], candidate: str, baseline: str, verdict: str
) -> list[str]:
    """The primary metrics on which ``candidate`` vs ``baseline`` has the corrected ``verdict``."""
    return [
        c.metric.key
        for c in comparisons
        if (c.candidate, c.baseline) == (candidate, baseline)
        and c.family == "primary"
        and c.verdict == verdict
    ]


def _titles(keys: Sequence[str]) -> str:
    return join_names([METRIC_TITLES[key] for key in keys])


def interpretation(comparisons: Sequence[PairedComparison], seeds: int) -> list[str]:
    """What the corrected headline verdicts say about alignment in general and about the cross-frame
    term; exploratory comparisons never enter these sentences."""
    if seeds < 2:
        return []
    if not any(c.family == "primary" and c.verdict in ("better", "worse") for c in comparisons):
        return [
            "No pair of variants differs on any primary metric at the corrected level: at this scale the "
            "differences in the table are within seed noise, and this run shows no effect of alignment or of "
            "CREPA's cross-frame term."
        ]
    aligned = [
        key
        for key in QUALITY_METRICS
        if any(key in _verdicts(comparisons, variant, "none", "better") for variant in ("repa", "crepa"))
    ]
    sentences = [
        f"Alignment (REPA* or CREPA) beats no alignment on {_titles(aligned)} (Holm-corrected)."
        if aligned
        else "Neither aligned variant beats no alignment on any primary metric at the corrected level."
    ]
    better = _verdicts(comparisons, "crepa", "repa", "better")
    worse = _verdicts(comparisons, "crepa", "repa", "worse")
    if not better and not worse:
        sentences.append(
            "The cross-frame term itself (CREPA against REPA*, which differ only in it) shows no effect on any "
            "primary metric at the corrected level."
        )
    else:
        sentences.append(
            f"The cross-frame term itself (CREPA against REPA*, which differ only in it) helps on "
            f"{_titles(better)} and hurts on {_titles(worse)} (Holm-corrected)."
        )
    return sentences


def diagnostic_sentence(comparisons: Sequence[PairedComparison]) -> str:
    """CKNNA as what it is: a diagnostic of the trained representation, with its q-values."""
    found = [c for c in comparisons if c.metric.key in DIAGNOSTIC_METRICS and c.count > 1]
    numbers = "; ".join(
        f"{VARIANT_LABELS.get(c.candidate, c.candidate)} vs {VARIANT_LABELS.get(c.baseline, c.baseline)} "
        f"{fmt_signed(c.mean)} (q = {fmt(c.p_adjusted if c.p_adjusted is not None else math.nan, 2)})"
        for c in found
    )
    return (
        "CKNNA is a diagnostic of the trained representation, not a measure of the clips: alignment trains "
        "the aligned block's features towards the teacher's directly, so a higher CKNNA shows that the alignment term "
        "took effect, not that the videos improved; it is never a headline metric"
        + (f" ({numbers})." if numbers else ".")
    )


def motion_sentences(
    comparisons: Sequence[PairedComparison],
    values: Mapping[str, Mapping[str, Mapping[int, float | None]]],
    clips: int,
) -> list[str]:
    """Whether each headline consistency gain survives the motion adjustment, with the paired change in
    flow magnitude (a frozen clip maximises every consistency score)."""
    sentences = []
    for comparison in comparisons:
        if comparison.family != "primary" or comparison.outcome != "better" or comparison.motion is None:
            continue
        motion = compare_pair(
            MORE_MOTION, comparison.candidate, comparison.baseline, values["flow_magnitude"], clips
        )
        adjusted = comparison.motion.p_adjusted
        head = (
            f"{VARIANT_LABELS[comparison.candidate]}'s gain in {comparison.metric.title} over "
            f"{VARIANT_LABELS[comparison.baseline]} (flow magnitude {fmt_signed(motion.mean, 2)} px per frame)"
        )
        if comparison.explained_by_motion:
            sentences.append(
                f"{head} does not survive the motion adjustment (Holm-adjusted p at matched motion "
                f"{fmt(adjusted if adjusted is not None else math.nan, 2)}): it is explained by less motion, not "
                "more consistency."
            )
        else:
            sentences.append(
                f"{head} survives the motion adjustment (Holm-adjusted p at matched motion "
                f"{fmt(adjusted if adjusted is not None else math.nan, 2)})."
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


def demo_verdict(
    results: ExperimentResults,
    comparisons: list[PairedComparison],
    references: Mapping[str, Mapping[str, float | None]],
) -> list[Block]:
    """The demo's paragraphs after the generic verdict: interpretation, motion caveats, context
    (``references``: the metrics of the real held-out clips and of their VAE reconstructions)."""
    values = {"flow_magnitude": {v: seed_values(results, v, "flow_magnitude") for v in VARIANTS}}
    variants = {v: aggregates(results, v) for v in VARIANTS}
    sentences = interpretation(comparisons, len(results.seeds))
    sentences += motion_sentences(comparisons, values, results.clips)
    if any(m.key in DIAGNOSTIC_METRICS for m in results.metrics):
        sentences.append(diagnostic_sentence(comparisons))
    sentences += context_sentences(variants, aggregates(results, "base"), references)
    return [("p", sentence) for sentence in sentences]
