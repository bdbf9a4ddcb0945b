"""The experiment's report: ``report.md`` and ``report.html`` (same content), ``report.json`` (the
numbers), ``samples.gif`` (a grid: one row per model, one column per prompt) and ``curves.png``
(training curves). Every file is written atomically, ``report.json`` last.

A caller adds to it without touching this module through :class:`ReportExtras`: its own intro,
verdict paragraphs, table rows (e.g. real clips), grid rows, sections, stages and JSON; extra metric
columns come from the evaluator's :class:`~crepa.experiment.verdict.MetricSpec` list.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.figure import Figure
from rich.table import Table

from crepa.cache.atomic import atomic_write_bytes
from crepa.eval.report import write_json, write_png
from crepa.experiment.runner import REPORT_FILE, ExperimentResults, clip_file
from crepa.experiment.verdict import (
    CONSISTENCY_METRICS,
    MOTION_METRIC,
    Aggregate,
    AnalysisPlan,
    PairedComparison,
    compare_all,
    compare_pair,
    comparison_table,
    exploratory_sentence,
    fmt,
    judge,
    method_sentence,
    motion_adjusted_values,
    pairs_in_order,
    questions_sentence,
    ranking_sentence,
    resolve_plan,
    summary_sentences,
)
from crepa.io.video import read_video_frames, write_video
from crepa.rundir import METRICS_FILE

GRID_SCALE = 3
LABEL_WIDTH = 92
TIMING_HEADING = "Time per stage"
TABLE_NOTE = (
    "p: the paired t-test on its own; adjusted p: Holm over the primary family (the headline) or the "
    "Benjamini-Hochberg q-value over the exploratory one; adjusted p at matched motion: the same test on the "
    "residuals of the metric regressed on flow magnitude (consistency metrics). Seeds needed: at the "
    "family's corrected level."
)
# ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", src, alt) | ("list", items)
Block = tuple


@dataclass
class ReportExtras:
    """What a caller adds to the report. ``verdict`` returns paragraphs placed after the generic
    verdict; ``reference_rows`` are table rows ({label: {metric: {"value": ...}}}); ``grid_rows``
    go above the models in the sample grid; ``stage_seconds`` / ``reused`` are the caller's own stages
    (shown before the experiment's); ``sections`` come before the timing section."""

    title: str = "crepa experiment"
    intro: Sequence[Block] | None = None
    verdict: Callable[[ExperimentResults, list[PairedComparison]], list[Block]] | None = None
    reference_rows: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    after_table: Sequence[Block] = ()
    grid_rows: Sequence[tuple[str, list[Path]]] = ()
    grid_columns: int = 6
    curves_note: str = ""
    sections: Sequence[Block] = ()
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    reused: Mapping[str, bool] = field(default_factory=dict)
    json: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- numbers
def metric_value(row: Mapping[str, Any], metric: str) -> float | None:
    """The finite value of ``metric`` in one evaluation row, else None."""
    entry = row.get(metric)
    value = entry.get("value") if isinstance(entry, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None


def seed_values(results: ExperimentResults, prefix: str, metric: str) -> dict[int, float | None]:
    return {
        seed: metric_value(results.rows.get(f"{prefix}-seed{seed}", {}), metric) for seed in results.seeds
    }


def aggregates(results: ExperimentResults, prefix: str) -> dict[str, Aggregate]:
    """Every metric of rows ``<prefix>-seed<k>`` over the seeds measured."""
    return {
        m.key: Aggregate(tuple(v for v in seed_values(results, prefix, m.key).values() if v is not None))
        for m in results.metrics
    }


def plan_of(results: ExperimentResults) -> AnalysisPlan:
    """The plan the experiment declared, or the default plan for its metrics."""
    return results.plan or resolve_plan(results.metrics)


def per_clip_pairs(
    results: ExperimentResults, prefix: str, metric: str
) -> dict[int, tuple[list[float], list[float]] | None]:
    """{seed: (metric per clip, flow magnitude per clip)} of rows ``<prefix>-seed<k>`` (None where the
    evaluation kept no per-clip values of both, or their clip counts differ)."""
    found: dict[int, tuple[list[float], list[float]] | None] = {}
    for seed in results.seeds:
        row = results.rows.get(f"{prefix}-seed{seed}", {})
        values, flow = (
            [math.nan if v is None else v for v in (row.get(key) or {}).get("per_clip") or []]
            for key in (metric, MOTION_METRIC)
        )
        found[seed] = (values, flow) if values and len(values) == len(flow) else None
    return found


def motion_comparisons(results: ExperimentResults) -> dict[tuple[str, str, str], PairedComparison]:
    """The consistency metrics' comparisons at matched motion, (metric, candidate, baseline) -> the
    paired comparison of per-seed mean residuals (:func:`motion_adjusted_values`); only where every run
    of every variant has per-clip values."""
    names = [v["name"] for v in results.variants]
    found = {}
    for metric in results.metrics:
        if metric.key not in CONSISTENCY_METRICS or metric.higher_is_better is None:
            continue
        per_clip = {name: per_clip_pairs(results, name, metric.key) for name in names}
        if any(pair is None for seeds in per_clip.values() for pair in seeds.values()):
            continue
        residuals = motion_adjusted_values(per_clip)
        flow = {name: seed_values(results, name, MOTION_METRIC) for name in names}
        for candidate, baseline in pairs_in_order(names):
            moved = compare_pair(metric, candidate, baseline, flow, results.clips).mean
            found[(metric.key, candidate, baseline)] = replace(
                compare_pair(metric, candidate, baseline, residuals, results.clips),
                flow_difference=moved if math.isfinite(moved) else None,
            )
    return found


def comparisons(results: ExperimentResults) -> list[PairedComparison]:
    """Every judged metric for every pair of variants (later vs earlier), paired by seed, placed in the
    plan's families (:func:`crepa.experiment.verdict.judge`) with the motion-adjusted comparisons."""
    names = [v["name"] for v in results.variants]
    values = {m.key: {name: seed_values(results, name, m.key) for name in names} for m in results.metrics}
    raw = compare_all(results.metrics, names, values, results.clips)
    return judge(raw, plan_of(results), motion_comparisons(results))


def verdict_paragraphs(results: ExperimentResults, found: list[PairedComparison]) -> dict[str, list[str]]:
    """Method, the questions asked, per-pair summary (headline only), exploratory leads and per-metric
    rankings, all from the numbers."""
    variants = {v["name"]: aggregates(results, v["name"]) for v in results.variants}
    tested = len(results.seeds) > 1
    return {
        "method": [method_sentence(len(results.seeds), results.clips)],
        "questions": [questions_sentence(found, plan_of(results))] if tested else [],
        "summary": summary_sentences(found, results.labels),
        "exploratory": [exploratory_sentence(found, results.labels)] if tested else [],
        "metrics": [
            ranking_sentence(m, {v: variants[v][m.key] for v in variants}, results.labels)
            for m in results.metrics
            if m.higher_is_better is not None and all(variants[v][m.key].values for v in variants)
        ],
    }


# ---------------------------------------------------------------- tables
def summary_table(
    results: ExperimentResults, extras: ReportExtras, short: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each variant and the base model as mean ± std over seeds, then the caller's
    reference rows (``short``: abbreviated column titles, for the terminal)."""
    metrics = results.metrics
    rows = [
        [v["label"], *(aggregates(results, v["name"])[m.key].text() for m in metrics)]
        for v in results.variants
    ]
    if results.base:
        base = aggregates(results, "base")
        rows.append(
            ["base model" if short else "base model (no fine-tuning)", *(base[m.key].text() for m in metrics)]
        )
    for label, row in extras.reference_rows.items():
        rows.append([label, *("-" if (v := metric_value(row, m.key)) is None else fmt(v) for m in metrics)])
    titles = [
        ((m.short or m.title) if short else m.title) + (m.arrow or ("" if short else " (context)"))
        for m in metrics
    ]
    return ["", *titles], rows


def seed_table(results: ExperimentResults) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every evaluated model at every seed."""
    names = [*results.runs, *([f"base-seed{seed}" for seed in results.seeds] if results.base else [])]
    rows = []
    for name in names:
        values = [metric_value(results.rows.get(name, {}), m.key) for m in results.metrics]
        rows.append([name, *("-" if v is None else fmt(v) for v in values)])
    return ["model", *(m.title + m.arrow for m in results.metrics)], rows


def timing_blocks(results: ExperimentResults, extras: ReportExtras) -> list[Block]:
    """The stages' wall time, what a rerun reused, and the machine (the one section that differs
    between an interrupted-and-resumed experiment and an uninterrupted one)."""
    stages = {**extras.stage_seconds, **results.stage_seconds}
    rows = [
        [stage, f"{seconds:.1f}", "reused from the cache" if extras.reused.get(stage) else ""]
        for stage, seconds in stages.items()
    ]
    rows.append(["total (before writing this report)", f"{sum(stages.values()):.1f}", ""])
    done = {
        key: [name for name, work in results.work.items() if work.get(key)]
        for key in ("trained", "sampled", "evaluated")
    }
    models = len(results.rows)
    earlier = [  # what this invocation found finished (a resumed or rerun experiment)
        (len(results.runs) - len(done["trained"]), "the training of {} run(s)"),
        (models - len(done["sampled"]), "the samples of {} model(s)"),
        (models - len(done["evaluated"]), "the evaluation of {} model(s)"),
    ]
    kept = ", ".join(text.format(count) for count, text in earlier if count)
    reused = (
        f"This invocation trained {len(done['trained'])} of {len(results.runs)} runs, sampled "
        f"{len(done['sampled'])} and evaluated {len(done['evaluated'])} of {models} models; "
        + (
            f"reused from an earlier invocation: {kept}."
            if kept
            else "nothing was reused from an earlier invocation."
        )
    )
    machine = results.machine
    per_run = machine["processes_per_run"]
    groups = f" Each run trained in {per_run} processes (accelerate launch)." if per_run > 1 else ""
    return [
        ("h", 2, TIMING_HEADING),
        ("table", ["stage", "seconds", ""], rows),
        ("p", reused),
        (
            "p",
            f"Machine: {machine['cpus']} CPUs, {machine['workers']} worker process(es) with "
            f"{machine['torch_threads']} torch thread(s) each, load average (1, 5, 15 min) "
            f"{machine['load_average_before']} at the start and {machine['load_average_after']} at the end."
            + groups,
        ),
    ]


# ---------------------------------------------------------------- figures
def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# Panel titles, broken into lines that fit a third of the figure's width.
CURVES = {
    "loss/diffusion": "diffusion loss",
    "crepa/sim_self": "own-frame similarity\n(block tokens, projected, to teacher)",
    "crepa/score": "alignment score: own + weighted\nneighbour cosines (CREPA's can pass 1)",
}


def curves_figure(results: ExperimentResults) -> Figure:
    """The logged training curves against the step: thin lines per seed, thick lines the mean over
    seeds (the alignment curves exist for the aligned variants only)."""
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    axes = {key: figure.add_subplot(1, len(CURVES), index + 1) for index, key in enumerate(CURVES)}
    palette = [f"C{index}" for index in range(10)]
    for index, variant in enumerate(results.variants):
        colour = palette[index % len(palette)]
        runs = results.out / "runs"
        logs = [
            read_metrics_log(runs / f"{variant['name']}-seed{seed}" / METRICS_FILE) for seed in results.seeds
        ]
        for key, axis in axes.items():
            curves = []
            for log in logs:
                points = [(row["step"], row[key]) for row in log if row.get(key) is not None]
                if points:
                    steps, values = zip(*points, strict=True)
                    axis.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                    curves.append((steps, values))
            if curves:
                length = min(len(values) for _, values in curves)
                mean = np.mean([values[:length] for _, values in curves], axis=0)
                axis.plot(curves[0][0][:length], mean, color=colour, label=variant["label"])
    for key, axis in axes.items():
        axis.set(title=CURVES[key], xlabel="step")
        axis.title.set_fontsize(9)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    return figure


def _cell(frames: np.ndarray, count: int, size: tuple[int, int]) -> np.ndarray:
    """(T, h, w, 3) -> (count, H, W, 3) with (H, W) = ``size``: nearest-neighbour upscaled by
    GRID_SCALE when that is the size, else resized (area average), padded by repeating the last frame."""
    picked = frames[np.minimum(np.arange(count), len(frames) - 1)]
    height, width = size
    if picked.shape[1:3] == (height // GRID_SCALE, width // GRID_SCALE) and height % GRID_SCALE == 0:
        return picked.repeat(GRID_SCALE, axis=1).repeat(GRID_SCALE, axis=2)
    return np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in picked])


def sample_grid(rows: Sequence[tuple[str, list[Path]]], max_side: int = 192) -> np.ndarray:
    """An animated grid (T, H, W, 3): one row per (label, clip files), a label column on the left.
    Cells keep the first clip's aspect: GRID_SCALE times its size, at most ``max_side`` pixels."""
    clips = [[read_video_frames(path)[0] for path in paths] for _, paths in rows]
    frames = max(len(clip) for row in clips for clip in row)
    first_height, first_width = clips[0][0].shape[1:3]
    scale = min(GRID_SCALE, max_side / max(first_height, first_width))
    cell_height, cell_width = round(first_height * scale), round(first_width * scale)
    gap = 2
    columns = max(len(row) for row in clips)
    height = len(rows) * (cell_height + gap) + gap
    width = LABEL_WIDTH + columns * (cell_width + gap) + gap
    grid = np.full((frames, height, width, 3), 255, np.uint8)
    for row_index, ((label, _), row) in enumerate(zip(rows, clips, strict=True)):
        top = gap + row_index * (cell_height + gap)
        for line_index, line in enumerate(label.split("\n")):
            baseline = top + cell_height // 2 + 4 + (line_index - label.count("\n") / 2) * 14
            for frame in grid:
                cv2.putText(frame, line, (4, int(baseline)), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (20, 20, 20), 1)
        for column, clip in enumerate(row):
            left = LABEL_WIDTH + gap + column * (cell_width + gap)
            grid[:, top : top + cell_height, left : left + cell_width] = _cell(
                clip, frames, (cell_height, cell_width)
            )
    return grid


def grid_rows(results: ExperimentResults, extras: ReportExtras) -> list[tuple[str, list[Path]]]:
    """The caller's rows, the base model and each variant at the first seed."""
    count = min(extras.grid_columns, len(results.prompts))
    seed = results.seeds[0]

    def sampled(name: str) -> list[Path]:
        return [results.out / "samples" / name / clip_file(seed, index) for index in range(count)]

    rows = [(label, paths[:count]) for label, paths in extras.grid_rows]
    if results.base:
        rows.append(("base model", sampled(f"base-seed{seed}")))
    rows += [(f"{v['label']}\n(seed {seed})", sampled(f"{v['name']}-seed{seed}")) for v in results.variants]
    return rows


# ---------------------------------------------------------------- documents
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


def default_intro(results: ExperimentResults) -> list[Block]:
    names = ", ".join(v["label"] for v in results.variants)
    return [
        (
            "p",
            f"{len(results.variants)} variants ({names}) x {len(results.seeds)} seeds "
            f"({', '.join(map(str, results.seeds))}), fine-tuned from one run file on one shared precompute "
            f"cache; run files in runs/. Each model sampled one clip per prompt ({results.clips} prompts) from "
            "the noise of seed k x 100003 + prompt index (seed k = its training seed), so at a given seed every "
            "variant saw the same batches, noise and timesteps in training and the same starting noise in "
            "sampling.",
        )
    ]


def report_blocks(
    results: ExperimentResults,
    extras: ReportExtras,
    paragraphs: dict[str, list[str]],
    found: list[PairedComparison],
) -> list[Block]:
    count = min(extras.grid_columns, len(results.prompts))
    prompts = "; ".join(f"{index + 1}. {prompt}" for index, prompt in enumerate(results.prompts[:count]))
    curves_note = (
        "At a given seed every variant sees the same batches, noise and timesteps, so the curves of the "
        "variants differ only through what the variants change."
    )
    return [
        ("h", 1, extras.title),
        *(extras.intro if extras.intro is not None else default_intro(results)),
        ("h", 2, "Verdict"),
        *(("p", sentence) for sentence in paragraphs["method"] + paragraphs["questions"]),
        ("list", paragraphs["summary"]),
        *(("p", sentence) for sentence in paragraphs["exploratory"]),
        *(extras.verdict(results, found) if extras.verdict else ()),
        *((("list", paragraphs["metrics"]),) if paragraphs["metrics"] else ()),
        ("h", 3, "Paired differences (later variant minus earlier, per seed)"),
        ("p", TABLE_NOTE),
        ("table", *comparison_table(found, results.labels)),
        ("h", 2, "Metrics (mean ± std over seeds)"),
        ("table", *summary_table(results, extras)),
        *extras.after_table,
        ("h", 2, "Samples"),
        ("img", "samples.gif", "sample grid"),
        ("p", f"Columns (prompts): {prompts}"),
        ("h", 2, "Training curves"),
        ("img", "curves.png", "training curves"),
        ("p", extras.curves_note or curves_note),
        ("h", 2, "Every model"),
        ("table", *seed_table(results)),
        *extras.sections,
        *timing_blocks(results, extras),
    ]


def write_report(results: ExperimentResults, extras: ReportExtras | None = None) -> dict[str, Any]:
    """Write every report file into ``results.out``; returns the content of ``report.json``."""
    extras = extras or ReportExtras()
    out = results.out
    found = comparisons(results)
    paragraphs = verdict_paragraphs(results, found)
    write_png(out / "curves.png", curves_figure(results))
    write_video(out / "samples.gif", sample_grid(grid_rows(results, extras)), fps=4)
    blocks = report_blocks(results, extras, paragraphs, found)
    atomic_write_bytes(out / "report.md", to_markdown(blocks).encode())
    atomic_write_bytes(out / "report.html", to_html(blocks, extras.title).encode())
    names = [v["name"] for v in results.variants] + (["base"] if results.base else [])
    content = {
        "variants": results.variants,
        "seeds": results.seeds,
        "prompts": results.prompts,
        "clips": results.clips,
        "metrics": [asdict(m) for m in results.metrics],
        "rows": results.rows,
        "reference_rows": dict(extras.reference_rows),
        "aggregates": {
            name: {
                key: {"mean": a.mean, "std": a.std, "values": list(a.values)}
                for key, a in aggregates(results, name).items()
            }
            for name in names
        },
        "plan": plan_of(results).record(),
        "comparisons": [c.record() for c in found],
        "verdict": paragraphs,
        "runs": results.runs,
        "stage_seconds": {**extras.stage_seconds, **results.stage_seconds},
        "work": results.work,
        "machine": results.machine,
        **extras.json,
    }
    write_json(out / REPORT_FILE, content)
    return content


def terminal_table(results: ExperimentResults, extras: ReportExtras | None = None) -> Table:
    """The report's metric table for the terminal (abbreviated titles, same numbers)."""
    header, rows = summary_table(results, extras or ReportExtras(), short=True)
    table = Table(*header, title=f"{(extras or ReportExtras()).title} (mean ± std over seeds)")
    for row in rows:
        table.add_row(*row)
    return table
