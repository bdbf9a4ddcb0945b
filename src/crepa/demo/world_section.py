"""The report's world-aware section: the world metrics per model, the ceiling set by the VAE (its
round-trip PSNR and the metrics of the held-out clips through it), the gap fine-tuning opens against
the base model (paired per seed, with :mod:`crepa.experiment.verdict`), and the per-block
adjacent-frame similarity figure. :mod:`crepa.demo.report` places these blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from crepa.demo.verdict import METRICS, VARIANTS
from crepa.experiment.report import Block, metric_value, seed_values
from crepa.experiment.runfiles import VARIANT_LABELS
from crepa.experiment.runner import ExperimentResults
from crepa.experiment.verdict import PairedComparison, compare_pair, comparison_table, fmt, fmt_signed

FINETUNED, BASE = "none", "base"  # plain LoRA fine-tuning against the model it started from
PROFILE_ROWS = (BASE, *VARIANTS)
PROFILE_LABELS = {BASE: "base model", **VARIANT_LABELS}
LAYER_FIGURE = "layer_similarity.png"
# The consistency measures whose fine-tuning gap the report states in words (the table has every metric).
GAP_METRICS = (
    "identity_persistence",
    "count_stability",
    "subject_consistency",
    "temporal_flickering",
    "warping_error",
)


def finetuning_gap(results: ExperimentResults) -> list[PairedComparison]:
    """Plain LoRA fine-tuning (no alignment) against the base model on every judged metric, paired per
    seed (at a seed both sample from the same noise)."""
    return [
        compare_pair(
            spec,
            FINETUNED,
            BASE,
            {row: seed_values(results, row, spec.key) for row in (FINETUNED, BASE)},
            results.clips,
        )
        for spec in METRICS
        if spec.higher_is_better is not None
    ]


def gap_sentence(gap: list[PairedComparison]) -> str:
    """How big the fine-tuning gap is on the consistency measures, with its verdict."""
    parts = []
    for comparison in gap:
        if comparison.metric.key not in GAP_METRICS or comparison.count == 0:
            continue
        interval = comparison.interval
        spread = (
            "" if interval is None else f" (95% CI {fmt_signed(interval[0])} to {fmt_signed(interval[1])})"
        )
        parts.append(
            f"{comparison.metric.title} {fmt_signed(comparison.mean)}{spread}: {comparison.verdict_phrase()}"
        )
    if not parts:
        return "The base model and the fine-tuned runs were not both measured: no gap to report."
    return (
        "Plain LoRA fine-tuning (no alignment) against the base model it started from, mean paired difference "
        "over seeds (fine-tuned minus base; the room CREPA claims to win back is a negative gap on these): "
        + "; ".join(parts)
        + "."
    )


def layer_profiles(results: ExperimentResults) -> dict[str, np.ndarray]:
    """Mean over seeds of each model's per-block adjacent-frame similarity: row -> (blocks,)."""
    profiles = {}
    for row in PROFILE_ROWS:
        found = [
            results.rows.get(f"{row}-seed{seed}", {}).get("layer_similarity", {}).get("per_block")
            for seed in results.seeds
        ]
        found = [profile for profile in found if profile]
        if found:
            profiles[row] = np.mean(np.asarray(found, dtype=np.float64), axis=0)
    return profiles


def layer_figure(profiles: Mapping[str, np.ndarray]) -> Figure:
    """Adjacent-frame cosine similarity of every block's hidden states, one line per model."""
    figure = Figure(figsize=(5.5, 3.4), layout="constrained")
    axis = figure.add_subplot()
    for row, profile in profiles.items():
        axis.plot(np.arange(len(profile)), profile, marker="o", label=PROFILE_LABELS[row])
    if profiles:
        axis.set_xticks(range(len(next(iter(profiles.values())))))
    axis.set(
        xlabel="block", ylabel="adjacent-frame similarity", title="hidden states, held-out clips (noised)"
    )
    axis.title.set_fontsize(9)
    axis.legend(fontsize=8)
    return figure


def world_blocks(
    results: ExperimentResults, references: Mapping[str, Mapping[str, Any]], block_index: int
) -> list[Block]:
    """Report blocks (see :mod:`crepa.demo.report`): what the world metrics mean, the ceiling, the
    fine-tuning gap, the layer figure (written by the caller from :func:`layer_profiles`);
    ``references`` holds the evaluation rows "real" and "reconstruction" (with "psnr")."""
    blocks: list[Block] = [
        ("h", 2, "World-aware metrics"),
        (
            "p",
            "The last six quality columns of the metric table come from the evaluation's classifiers (trained on the world's ground truth, never the training "
            "teacher), per sampled clip: colour / shape / texture accuracy = fraction of frames whose predicted "
            "set of colours (shapes, patterns) is exactly the caption's; identity persistence = fraction of "
            "frames 1.. whose predicted attributes all equal frame 0's; count stability = fraction of frames "
            "showing as many objects as the caption names; motion correctness = the predicted motions (bounces / "
            "moves and direction, rotates) are exactly the caption's. Occlusion lowers these on real clips too: "
            "the table's last two rows are the ceiling.",
        ),
    ]
    psnr = metric_value(references.get("reconstruction", {}), "psnr")
    if psnr is not None:
        blocks.append(
            (
                "p",
                f"Ceiling: the held-out clips through the VAE (encode, decode) have a round-trip PSNR of "
                f"{fmt(psnr, 3)} dB; the metric table's row 'held-out clips through the VAE' shows how much of "
                "each world metric survives the latent space alone, so a variant can at best approach that row "
                "(and the real clips' row is what the captions' own clips score).",
            )
        )
    gap = finetuning_gap(results)
    blocks += [
        ("h", 3, "Fine-tuned vs base (plain LoRA, no alignment, minus the base model, per seed)"),
        ("p", gap_sentence(gap)),
        ("table", *comparison_table(gap, {FINETUNED: "fine-tuned", BASE: "base"})),
    ]
    profiles = layer_profiles(results)
    if profiles:
        text = "; ".join(
            f"{PROFILE_LABELS[row]} " + ", ".join(fmt(v, 3) for v in profile)
            for row, profile in profiles.items()
        )
        blocks += [
            ("h", 2, "Per-block adjacent-frame similarity"),
            ("img", LAYER_FIGURE, "per-block adjacent-frame similarity"),
            (
                "p",
                "Cosine similarity of each block's hidden states between adjacent latent frames (token by token "
                "at the same position), on the held-out clips noised as in training, mean over seeds (RepVideo's "
                f"diagnostic, crepa.eval.layers); block {block_index} is the aligned one. Values by block: {text}.",
            ),
        ]
    return blocks
