"""What the demo adds to ``crepa experiment``'s report (:mod:`crepa.experiment.report`): its intro,
the verdict paragraphs about alignment and the cross-frame term, the real held-out clips and their VAE
reconstructions as table and grid rows, notes on the metrics, and how the world and models are built."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from crepa.demo.verdict import TABLE_METRICS, demo_verdict
from crepa.demo.world import World
from crepa.experiment.report import ReportExtras, metric_value
from crepa.experiment.runner import ExperimentResults

TITLE = "crepa demo: CREPA vs REPA* vs no alignment on a synthetic video world"
REFERENCE_LABELS = {"real": "held-out real clips", "reconstruction": "held-out clips through the VAE"}
PROSE_FILE = "how_it_is_built.md"  # package data next to this module: what was built, tried and measured


def how_it_is_built(settings: Mapping[str, Any], seeds: int) -> list[str]:
    """The items of the report's "How it is built" list, from :data:`PROSE_FILE`: each ``- `` item one
    paragraph (its lines joined with a space), its ``{name}`` fields filled in from the run's settings
    (the numbers of the run made, quick or full); text outside the list is left out."""
    finetune, sampling = settings["finetune"], settings["sampling"]
    values = {
        **finetune,
        "seeds": seeds,
        "samples_per_prompt": sampling["samples_per_prompt"],
        "clips_per_model": sampling["samples_per_prompt"] * settings["world"]["clips"]["heldout"],
        "layers": settings["base"]["layers"],
    }
    text = resources.files("crepa.demo").joinpath(PROSE_FILE).read_text(encoding="utf-8")
    items: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("- "):
            items.append([line[2:]])
        elif line.startswith("  ") and items:
            items[-1].append(line.strip())
        elif not line.strip() and items:
            items.append([])  # a blank line ends the item
    return [" ".join(item).format_map(values) for item in items if item]


def intro(settings: Mapping[str, Any], seeds: int) -> str:
    world, finetune = settings["world"], settings["finetune"]
    return (
        f"A tiny CogVideoX transformer, pre-trained on the generic split of a procedural world, is "
        f"fine-tuned with LoRA (rank {finetune['rank']}, {finetune['steps']} steps, batch "
        f"{finetune['batch_size']}) on {world['clips']['attribute']} clips of a dotted star that bounces (an "
        f"attribute and a motion the base model never saw), three ways: no alignment, REPA* (frame-wise) and "
        f"CREPA (own frame plus neighbours at distance 1, tau 1), alignment weight {finetune['weight']} on "
        f"block {finetune['block_index']}, for {seeds} seeds each, with crepa experiment. Each model then "
        f"samples {settings['sampling']['samples_per_prompt']} clip(s) for each of the "
        f"{world['clips']['heldout']} held-out captions "
        f"({world['num_frames']} frames of {world['size']}x{world['size']}); the clips are measured with "
        "crepa eval against the held-out real clips."
    )


def metric_notes(settings: Mapping[str, Any]) -> str:
    return (
        "Subject consistency and the Frechet distance use the features of an attribute classifier trained on "
        "the world's ground truth (not the training teacher). CKNNA compares block "
        f"{settings['finetune']['block_index']}'s hidden states (no projector) with the teacher's patch "
        "features of the held-out clips, one sample per clip, latent frame and noise draw. Flicker, warping "
        "error, dynamic degree and flow magnitude follow crepa eval (OpenCV DIS flow). The Frechet distance "
        f"over {settings['world']['clips']['heldout']} clips is unstable in absolute terms; compare rows only."
    )


def demo_extras(
    settings: Mapping[str, Any],
    seeds: int,
    world: World,
    references: Mapping[str, Mapping[str, Any]],
    reconstruction_dir: Path,
    stage_seconds: Mapping[str, float],
    reused: Mapping[str, bool],
) -> ReportExtras:
    """The demo's additions to the experiment report; ``references`` holds the evaluation of the real
    held-out clips ("real") and of their VAE reconstructions ("reconstruction")."""
    values = {
        row: {metric: metric_value(references.get(row, {}), metric) for metric in TABLE_METRICS}
        for row in REFERENCE_LABELS
    }
    count = len(world.specs["heldout"])
    real = [world.split_dir("heldout") / f"{spec.name}.mp4" for spec in world.specs["heldout"]]
    reconstructed = [reconstruction_dir / f"clip-{index:04d}.mp4" for index in range(count)]

    def verdict(results: ExperimentResults, comparisons):
        return demo_verdict(results, comparisons, values)

    return ReportExtras(
        title=TITLE,
        intro=[("p", intro(settings, seeds))],
        verdict=verdict,
        reference_rows={label: references.get(row, {}) for row, label in REFERENCE_LABELS.items()},
        after_table=[("p", metric_notes(settings))],
        grid_rows=[("real clips", real), ("through the\nVAE", reconstructed)],
        curves_note=(
            "At a given seed every variant sees the same batches, noise and timesteps, so the curves of the "
            "variants differ only through the alignment term."
        ),
        sections=[("h", 2, "How it is built"), ("list", how_it_is_built(settings, seeds))],
        stage_seconds=stage_seconds,
        reused=reused,
        json={"settings": dict(settings), "references": dict(references)},
    )
