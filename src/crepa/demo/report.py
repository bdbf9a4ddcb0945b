"""The demo's report: ``report.md`` and ``report.html`` (same content), ``report.json`` (the numbers),
``samples.gif`` (a grid of clips per row next to the real ones) and ``curves.png`` (training curves).
Every file is written atomically; ``report.json`` last."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.figure import Figure
from rich.table import Table

from crepa.cache.atomic import atomic_write_bytes
from crepa.demo.experiment import VARIANT_LABELS, VARIANTS
from crepa.demo.verdict import (
    METRIC_TITLES,
    QUALITY_METRICS,
    TABLE_METRICS,
    aggregate,
    fmt_aggregate,
    metric_value,
    verdict,
)
from crepa.demo.world import World
from crepa.eval.report import write_json, write_png
from crepa.experiment.verdict import Aggregate, PairedComparison, comparison_table, fmt
from crepa.io.video import read_video_frames, write_video

GRID_COLUMNS = 6
GRID_SCALE = 3
LABEL_WIDTH = 92
STAGES = ("world", "teacher", "extractor", "base model", "precompute", "fine-tune", "sample + eval")


@dataclass
class DemoResults:
    """What the report shows: settings, evaluation rows (row -> metric -> entry with "value"), which
    cached artefacts were reused, wall time per stage and the machine's state."""

    settings: dict[str, Any]
    runs: list[str]
    seeds: int
    metrics: dict[str, dict[str, Any]]
    reused: dict[str, bool]
    stage_seconds: dict[str, float]
    machine: dict[str, Any]


def variant_aggregates(results: DemoResults) -> dict[str, dict[str, Aggregate]]:
    return {variant: aggregate(results.metrics, variant, results.seeds) for variant in VARIANTS}


def reference_values(results: DemoResults) -> dict[str, dict[str, float | None]]:
    return {
        row: {metric: metric_value(results.metrics, row, metric) for metric in TABLE_METRICS}
        for row in ("real", "reconstruction")
    }


SHORT_TITLES = {
    "subject_consistency": "subject",
    "temporal_flickering": "flicker",
    "warping_error": "warp err",
    "frechet_distance": "FD",
    "cknna": "CKNNA",
    "dynamic_degree": "dyn. deg",
    "flow_magnitude": "flow px",
}
ROW_TITLES = {  # (report, terminal)
    "base": ("base model (no fine-tuning)", "base model"),
    "reconstruction": ("held-out clips through the VAE", "VAE recon."),
    "real": ("held-out real clips", "real clips"),
}


def column_title(metric: str, short: bool = False) -> str:
    arrow = {"higher": " ↑", "lower": " ↓"}.get(QUALITY_METRICS.get(metric, ""), "" if short else " (motion)")
    return (SHORT_TITLES if short else METRIC_TITLES)[metric] + arrow


def summary_table(results: DemoResults, short: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the variants and the base model as mean ± std over seeds, then the references
    (``short``: abbreviated titles for the terminal)."""
    rows = []
    for variant, entries in variant_aggregates(results).items():
        rows.append([VARIANT_LABELS[variant], *(fmt_aggregate(entries[m]) for m in TABLE_METRICS)])
    base = aggregate(results.metrics, "base", results.seeds)
    rows.append([ROW_TITLES["base"][short], *(fmt_aggregate(base[m]) for m in TABLE_METRICS)])
    for row, values in reference_values(results).items():
        cells = ("-" if values[m] is None else fmt(values[m]) for m in TABLE_METRICS)
        rows.append([ROW_TITLES[row][short], *cells])
    return ["", *(column_title(m, short) for m in TABLE_METRICS)], rows


def seed_table(results: DemoResults) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every evaluated model at every seed."""
    names = [*results.runs, *(f"base-seed{seed}" for seed in range(results.seeds))]
    rows = []
    for name in names:
        values = [metric_value(results.metrics, name, metric) for metric in TABLE_METRICS]
        rows.append([name, *("-" if v is None else fmt(v) for v in values)])
    return ["run", *map(column_title, TABLE_METRICS)], rows


def timing_table(results: DemoResults) -> tuple[list[str], list[list[str]]]:
    rows = []
    for stage in STAGES:
        seconds = results.stage_seconds.get(stage)
        if seconds is None:
            continue
        note = "reused from the cache" if results.reused.get(stage) else ""
        rows.append([stage, f"{seconds:.1f}", note])
    total = sum(results.stage_seconds.get(stage, 0.0) for stage in STAGES)
    rows.append(["total (before writing this report)", f"{total:.1f}", ""])
    return ["stage", "seconds", ""], rows


# ---------------------------------------------------------------- figures
def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


CURVES = {
    "loss/diffusion": "diffusion loss (v-prediction MSE)",
    "crepa/sim_self": "own-frame similarity (block tokens, projected, to teacher)",
    "crepa/score": "alignment score (own + weighted neighbour cosines; CREPA's can pass 1)",
}


def curves_figure(runs_root: Path, seeds: int) -> Figure:
    """The logged training curves against the step: thin lines per seed, thick lines the mean over
    seeds (the alignment curves exist for REPA* and CREPA only)."""
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    axes = {key: figure.add_subplot(1, len(CURVES), index + 1) for index, key in enumerate(CURVES)}
    colours = {"none": "#4C72B0", "repa": "#DD8452", "crepa": "#55A868"}
    for variant in VARIANTS:
        logs = [
            read_metrics_log(runs_root / f"{variant}-seed{seed}" / "metrics.jsonl") for seed in range(seeds)
        ]
        for key, axis in axes.items():
            curves = []
            for log in logs:
                points = [(row["step"], row[key]) for row in log if row.get(key) is not None]
                if points:
                    steps, values = zip(*points, strict=True)
                    axis.plot(steps, values, color=colours[variant], alpha=0.25, linewidth=0.8)
                    curves.append((steps, values))
            if curves:
                length = min(len(values) for _, values in curves)
                mean = np.mean([values[:length] for _, values in curves], axis=0)
                axis.plot(curves[0][0][:length], mean, color=colours[variant], label=VARIANT_LABELS[variant])
    for key, axis in axes.items():
        axis.set(title=CURVES[key], xlabel="step")
        axis.title.set_fontsize(9)
        axis.legend(fontsize=8)
    return figure


def _cell(frames: np.ndarray, count: int) -> np.ndarray:
    """(T, h, w, 3) -> (count, h*S, w*S, 3), nearest-neighbour upscaled, padded by repeating the last frame."""
    picked = frames[np.minimum(np.arange(count), len(frames) - 1)]
    return picked.repeat(GRID_SCALE, axis=1).repeat(GRID_SCALE, axis=2)


def sample_grid(rows: Sequence[tuple[str, list[Path]]]) -> np.ndarray:
    """An animated grid (T, H, W, 3): one row per (label, clip files), a label column on the left."""
    clips = [[read_video_frames(path)[0] for path in paths] for _, paths in rows]
    frames = max(len(clip) for row in clips for clip in row)
    side = clips[0][0].shape[1] * GRID_SCALE
    gap = 2
    columns = max(len(row) for row in clips)
    height = len(rows) * (side + gap) + gap
    width = LABEL_WIDTH + columns * (side + gap) + gap
    grid = np.full((frames, height, width, 3), 255, np.uint8)
    for row_index, ((label, _), row) in enumerate(zip(rows, clips, strict=True)):
        top = gap + row_index * (side + gap)
        for line_index, line in enumerate(label.split("\n")):
            baseline = top + side // 2 + 4 + (line_index - label.count("\n") / 2) * 14
            for frame in grid:
                cv2.putText(frame, line, (4, int(baseline)), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (20, 20, 20), 1)
        for column, clip in enumerate(row):
            left = LABEL_WIDTH + gap + column * (side + gap)
            grid[:, top : top + side, left : left + side] = _cell(clip, frames)
    return grid


def grid_rows(out: Path, world: World, results: DemoResults) -> list[tuple[str, list[Path]]]:
    """Real clips, their VAE reconstructions, the base model and each variant at seed 0."""
    count = min(GRID_COLUMNS, len(world.specs["heldout"]))
    real = [world.split_dir("heldout") / f"{spec.name}.mp4" for spec in world.specs["heldout"][:count]]

    def sampled(row: str) -> list[Path]:
        return [out / "samples" / row / f"clip-{index:04d}.mp4" for index in range(count)]

    rows = [
        ("real clips", real),
        ("through the\nVAE", sampled("reconstruction")),
        ("base model", sampled("base-seed0")),
    ]
    rows += [(f"{VARIANT_LABELS[variant]}\n(seed 0)", sampled(f"{variant}-seed0")) for variant in VARIANTS]
    return rows


# ---------------------------------------------------------------- documents
Block = (
    tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", src, alt) | ("list", items)
)


def to_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "img":
            parts.append(f"![{block[2]}]({block[1]})")
        else:
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}"></p>')
        else:
            header = "".join(f"<th>{html.escape(cell)}</th>" for cell in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                for row in block[2]
            )
            body.append(f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%;image-rendering:pixelated}"
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def report_blocks(
    results: DemoResults,
    paragraphs: dict[str, list[str]],
    comparisons: list[PairedComparison],
    world: World,
) -> list[Block]:
    settings = results.settings
    world_settings, finetune = settings["world"], settings["finetune"]
    prompts = [spec.caption for spec in world.specs["heldout"][:GRID_COLUMNS]]
    blocks: list[Block] = [
        ("h", 1, "crepa demo: CREPA vs REPA* vs no alignment on a synthetic video world"),
        (
            "p",
            f"A tiny CogVideoX transformer, pre-trained on the generic split of a procedural world, is "
            f"fine-tuned with LoRA (rank {finetune['rank']}, {finetune['steps']} steps, batch "
            f"{finetune['batch_size']}) on {world_settings['clips']['attribute']} clips of a dotted star "
            f"that bounces (an attribute and a motion the base model never saw), three ways: no alignment, "
            f"REPA* (frame-wise) and CREPA (own frame plus neighbours at distance 1, tau 1), alignment weight "
            f"{finetune['weight']} on block {finetune['block_index']}, for {results.seeds} seeds each. Each "
            f"model then samples one clip for each of the {world_settings['clips']['heldout']} held-out "
            f"captions ({world_settings['num_frames']} frames of {world_settings['size']}x"
            f"{world_settings['size']}); the clips are measured with crepa eval against the held-out real clips.",
        ),
        ("h", 2, "Verdict"),
        *(("p", sentence) for sentence in paragraphs["method"]),
        ("list", paragraphs["summary"]),
        ("list", paragraphs["metrics"]),
        *(("p", sentence) for sentence in paragraphs["caveats"] + paragraphs["context"]),
        ("h", 3, "Paired differences (later variant minus earlier, per seed)"),
        ("table", *comparison_table(comparisons, VARIANT_LABELS)),
        ("h", 2, "Metrics (mean ± std over seeds)"),
        ("table", *summary_table(results)),
        (
            "p",
            "Subject consistency and the Frechet distance use the features of an attribute classifier "
            "trained on the world's ground truth (not the training teacher). CKNNA compares block "
            f"{finetune['block_index']}'s hidden states (no projector) with the teacher's patch features of "
            "the held-out clips, one sample per clip, latent frame and noise draw. Flicker, warping error, "
            "dynamic degree and flow magnitude follow crepa eval (OpenCV DIS flow). The Frechet distance over "
            f"{world_settings['clips']['heldout']} clips is unstable in absolute terms; compare rows only.",
        ),
        ("h", 2, "Samples"),
        ("img", "samples.gif", "sample grid"),
        ("p", "Columns (held-out captions): " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))),
        ("h", 2, "Training curves"),
        ("img", "curves.png", "training curves"),
        (
            "p",
            "At a given seed every variant sees the same batches, noise and timesteps, so the curves of "
            "the variants differ only through the alignment term.",
        ),
        ("h", 2, "Every run"),
        ("table", *seed_table(results)),
        ("h", 2, "Time per stage"),
        ("table", *timing_table(results)),
        (
            "p",
            f"Machine: {results.machine['cpus']} CPUs, {results.machine['workers']} worker process(es) with "
            f"{results.machine['torch_threads']} torch thread(s) each, "
            f"load average (1, 5, 15 min) {results.machine['load_average_before']} at the start and "
            f"{results.machine.get('load_average_after')} at the end.",
        ),
        ("h", 2, "How it is built"),
        (
            "list",
            [
                "World: procedural squares, circles and stars (plain, striped, dotted, 8 colours) that move, "
                "spin or bounce and occlude each other over textured backgrounds; captions from the attributes; "
                "written as mp4 + txt, the dataset format users give crepa. Generic split for the base model "
                "(never a dotted star, never a bounce), attribute split for fine-tuning, held-out split for "
                "evaluation.",
                "Latent space: a fixed linear autoencoder with the compression of CogVideoX's VAE (4x in time, "
                "8x in space): 8x8-pixel, 4-frame blocks (frame 0 alone) projected on their leading principal "
                "components, fitted in closed form on the generic split. A trained diffusers VAE did not fit "
                "the time budget (one step of the smallest AutoencoderKLWan takes seconds on 2 cores), and a "
                "pure pixel shuffle (768 channels) is wider than the tiny transformer, whose output projection "
                "cannot reach the other channels. It is saved as the pipeline's vae and loaded by "
                "CogVideoXPipeline.from_pretrained.",
                "Teacher: a tiny DINOv2 (transformers Dinov2Model, patch 8: a 4x4 grid on 32x32 frames, the "
                "student's grid) trained by masked patch prediction on generic frames, loaded with "
                "crepa.teachers.load_teacher.",
                "Base model: CogVideoXTransformer3DModel (patch 1), pre-trained on the generic split with crepa "
                "precompute + crepa train (full fine-tuning, no alignment). Fine-tuning runs are run files in "
                "runs/ (crepa precompute + crepa train), their LoRA is loaded into CogVideoXPipeline with "
                "load_lora_weights for sampling.",
            ],
        ),
    ]
    return blocks


def write_report(out: Path, results: DemoResults, world: World, runs_root: Path) -> dict[str, Any]:
    """Write every report file into ``out``; returns the content of ``report.json``."""
    variants = variant_aggregates(results)
    base = aggregate(results.metrics, "base", results.seeds)
    clips = results.settings["world"]["clips"]["heldout"]
    paragraphs, comparisons = verdict(results.metrics, results.seeds, clips, reference_values(results))
    write_png(out / "curves.png", curves_figure(runs_root, results.seeds))
    write_video(out / "samples.gif", sample_grid(grid_rows(out, world, results)), fps=4)
    blocks = report_blocks(results, paragraphs, comparisons, world)
    title = "crepa demo report"
    atomic_write_bytes(out / "report.md", to_markdown(blocks).encode())
    atomic_write_bytes(out / "report.html", to_html(blocks, title).encode())
    content = {
        **asdict(results),
        "aggregates": {
            variant: {m: {"mean": e.mean, "std": e.std, "values": list(e.values)} for m, e in entries.items()}
            for variant, entries in {**variants, "base": base}.items()
        },
        "verdict": paragraphs,
        "comparisons": [c.record() for c in comparisons],
    }
    write_json(out / "report.json", content)
    return content


def terminal_table(results: DemoResults) -> Table:
    """The report's metric table for the terminal (abbreviated titles, same numbers)."""
    header, rows = summary_table(results, short=True)
    table = Table(*header, title="crepa demo (mean ± std over seeds)")
    for row in rows:
        table.add_row(*row)
    return table
