"""Report files: metrics.json, per_video.csv and PNG plots; comparisons of runs; per-layer curves.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so an interrupted run never leaves a half-written file; ``metrics.json`` is
written last, so its presence means the run's report is complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from crepa import __version__
from crepa.cache.atomic import atomic_write_bytes
from crepa.data.report import SkippedFile
from crepa.eval.evaluate import BETTER, PER_CLIP_METRICS, EvalResult

METRICS_FILE = "metrics.json"
# Scores in [0, 1] that usually sit close to 1: their bar charts start just below the lowest bar.
NEAR_ONE_METRICS = ("subject_consistency", "background_consistency", "temporal_flickering")
LAYERS_FILE = "layers.json"
SKIPPED_FILE = "skipped.csv"


def write_json(path: Path, content: Any) -> None:
    """Atomic JSON with NaN / infinity written as null (JSON has no NaN)."""
    atomic_write_bytes(path, (json.dumps(_finite(content), indent=2) + "\n").encode())


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Atomic CSV; NaN and None become empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(
            [
                "" if cell is None or (isinstance(cell, float) and not math.isfinite(cell)) else cell
                for cell in row
            ]
        )
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_png(path: Path, figure: Figure) -> None:
    """Render a matplotlib figure with the Agg canvas (no GUI backend) and write it atomically. A figure
    with a layout engine is saved as laid out: a tight bounding box on top would draw it twice."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    crop = {} if figure.get_layout_engine() is not None else {"bbox_inches": "tight"}
    figure.savefig(buffer, format="png", dpi=110, **crop)
    atomic_write_bytes(path, buffer.getvalue())


def _grid_figure(count: int, columns: int = 3, size: tuple[float, float] = (4.0, 3.0)) -> tuple[Figure, list]:
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    # "tight" rather than "constrained": same spacing for a plain grid, at half the layout cost
    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="tight")
    axes = [figure.add_subplot(rows, columns, index + 1) for index in range(count)]
    return figure, axes


def _title(metric: str) -> str:
    direction = BETTER.get(metric)
    return metric.replace("_", " ") + (f" ({direction} is better)" if direction else " (motion)")


def write_eval_report(
    out_dir: str | Path,
    result: EvalResult,
    *,
    videos_dir: str | Path,
    reference_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write per_video.csv, skipped.csv (every skipped file and why; header only when none),
    distributions.png and metrics.json (last) into ``out_dir``; returns the metrics."""
    out = Path(out_dir)
    skipped = [("videos", item) for item in result.skipped]
    skipped += [("reference", item) for item in result.reference_skipped]
    write_csv(
        out / SKIPPED_FILE,
        ["set", "path", "problem", "detail"],
        [[label, item.path, item.problem, item.detail] for label, item in skipped],
    )
    metrics = [m for m in PER_CLIP_METRICS if m in result.summary]
    write_csv(
        out / "per_video.csv",
        ["name", "path", "frames", "height", "width", "fps", *metrics, "caption"],
        [
            [clip.name, clip.path, clip.frames, clip.height, clip.width, round(clip.fps, 4)]
            + [clip.values[m] for m in metrics]
            + [clip.caption or ""]
            for clip in result.clips
        ],
    )
    plots = []
    if metrics and result.clips:
        write_png(out / "distributions.png", distributions_figure(result, metrics))
        plots.append("distributions.png")

    content = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "crepa_version": __version__,
        "videos_dir": str(videos_dir),
        "reference_dir": str(reference_dir) if reference_dir is not None else None,
        "clips": len(result.clips),
        "skipped": [_skipped_entry(item) for item in result.skipped],
        "reference_skipped": [_skipped_entry(item) for item in result.reference_skipped],
        "extractors": result.extractors,
        "flow_method": result.flow_method,
        "metrics": result.summary,
        "timings_s": {stage: round(seconds, 3) for stage, seconds in result.timings.items()},
        "files": ["per_video.csv", SKIPPED_FILE, *plots],
    }
    write_json(out / METRICS_FILE, content)
    return content


def _skipped_entry(item: SkippedFile) -> dict[str, str]:
    return {"path": item.path, "problem": item.problem, "detail": item.detail, "reason": item.reason}


def distributions_figure(result: EvalResult, metrics: Sequence[str]) -> Figure:
    """One histogram per metric of its per-clip values, with the aggregate as a vertical line."""
    figure, axes = _grid_figure(len(metrics))
    for axis, metric in zip(axes, metrics, strict=True):
        values = [clip.values[metric] for clip in result.clips if math.isfinite(clip.values[metric])]
        axis.hist(values, bins=min(30, max(5, len(values) // 3)), color="#4C72B0", alpha=0.85)
        aggregate = result.summary[metric]["value"]
        if aggregate is not None:
            axis.axvline(aggregate, color="#C44E52", linestyle="--", label=f"{aggregate:.4g}")
            axis.legend(fontsize=8)
        axis.set_title(_title(metric), fontsize=9)
        axis.locator_params(axis="x", nbins=4)
        axis.set_xlabel("per-clip value", fontsize=8)
        axis.set_ylabel("clips", fontsize=8)
    figure.suptitle(f"{len(result.clips)} clips", fontsize=10)
    return figure


def write_layer_report(
    out_dir: str | Path,
    profiles: Mapping[str, Sequence[float]],
    cknna: Mapping[str, float] | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """layers.json and layers.png: per-block adjacent-frame similarity for each labelled model
    (e.g. "base", "lora"), CKNNA values by label when given, and any ``details`` (block, samples)."""
    out = Path(out_dir)
    content: dict[str, Any] = dict(details or {})
    content["adjacent_frame_similarity"] = {k: [float(v) for v in p] for k, p in profiles.items()}
    if cknna:
        content["cknna"] = {label: float(value) for label, value in cknna.items()}
    write_png(out / "layers.png", layers_figure(content["adjacent_frame_similarity"]))
    write_json(out / LAYERS_FILE, content)


def layers_figure(profiles: Mapping[str, Sequence[float]]) -> Figure:
    """Per-layer curves: block index against adjacent-frame cosine similarity, one line per label."""
    figure = Figure(figsize=(6.5, 4.0), layout="constrained")
    axis = figure.add_subplot(1, 1, 1)
    for label, profile in profiles.items():
        axis.plot(range(len(profile)), profile, marker="o", markersize=3, label=label)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("block index")
    axis.set_ylabel("adjacent latent-frame cosine similarity")
    axis.set_title("hidden-state similarity of adjacent frames per layer (RepVideo's analysis)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's metrics.json, with its layers.json under "layers" (either may be missing)."""
    run = Path(run_dir)
    metrics_path, layers_path = run / METRICS_FILE, run / LAYERS_FILE
    if not metrics_path.is_file() and not layers_path.is_file():
        raise ValueError(
            f"{run}: no {METRICS_FILE} or {LAYERS_FILE}; give output folders of finished `crepa eval` runs"
        )
    content = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {"metrics": {}}
    if layers_path.is_file():
        content["layers"] = json.loads(layers_path.read_text())
    return content


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their parent folder when two runs share a name."""
    names = [path.resolve().name for path in run_dirs]
    return [
        f"{path.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for path, name in zip(run_dirs, names, strict=True)
    ]


def write_comparison(out_dir: str | Path, run_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """comparison.json, comparison.csv and comparison.png (bars with +-1 standard error over clips)
    for the runs; comparison_layers.png when runs have per-layer profiles. Returns the table."""
    if len(run_dirs) < 2:
        raise ValueError("--compare needs at least two run folders")
    paths = [Path(run) for run in run_dirs]
    runs = {label: load_run(path) for label, path in zip(run_labels(paths), paths, strict=True)}
    metrics = [
        m for m in (*PER_CLIP_METRICS, "frechet_distance") if any(m in r["metrics"] for r in runs.values())
    ]
    table = {label: {m: run["metrics"].get(m) for m in metrics} for label, run in runs.items()}
    notes = _comparability_notes(runs, metrics)
    out = Path(out_dir)
    rows = []
    for label, entries in table.items():
        for metric, entry in entries.items():
            if entry is not None:
                rows.append(
                    [
                        label,
                        metric,
                        entry.get("value"),
                        entry.get("sem"),
                        entry.get("count", entry.get("clips")),
                    ]
                )
    write_csv(out / "comparison.csv", ["run", "metric", "value", "sem", "clips"], rows)
    files = ["comparison.csv"]
    if metrics:
        write_png(out / "comparison.png", comparison_figure(table, metrics))
        files.append("comparison.png")
    layer_profiles = {
        f"{label}: {name}": profile
        for label, run in runs.items()
        for name, profile in run.get("layers", {}).get("adjacent_frame_similarity", {}).items()
    }
    if layer_profiles:
        write_png(out / "comparison_layers.png", layers_figure(layer_profiles))
        files.append("comparison_layers.png")
    cknna = {
        f"{label}: {name}": value
        for label, run in runs.items()
        for name, value in run.get("layers", {}).get("cknna", {}).items()
    }
    content = {"runs": {label: str(path) for label, path in zip(runs, paths, strict=True)}, "metrics": table}
    if cknna:
        content["cknna"] = cknna
    content.update({"notes": notes, "files": files})
    write_json(out / "comparison.json", content)
    return content


def comparison_figure(table: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> Figure:
    """One bar chart per metric, runs side by side, error bars of one standard error over clips."""
    figure, axes = _grid_figure(len(metrics))
    labels = list(table)
    colors = [f"C{index % 10}" for index in range(len(labels))]
    for axis, metric in zip(axes, metrics, strict=True):
        values, errors = [], []
        for label in labels:
            entry = table[label].get(metric) or {}
            values.append(entry.get("value") if entry.get("value") is not None else math.nan)
            errors.append(entry.get("sem") or 0.0)
        axis.bar(range(len(labels)), values, yerr=errors, capsize=4, color=colors)
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(
            [f"{label}\n{value:.4g}" for label, value in zip(labels, values, strict=True)], fontsize=8
        )
        axis.set_title(_title(metric), fontsize=9)
        finite = [v - e for v, e in zip(values, errors, strict=True) if math.isfinite(v)]
        if metric in NEAR_ONE_METRICS and finite:
            # scores crowd near 1: start the axis just below the lowest bar, and say so
            axis.set_ylim(max(0.0, min(finite) - 0.1 * (1.0 - min(finite)) - 1e-4), 1.0)
            axis.set_ylabel("axis does not start at 0", fontsize=7)
    figure.suptitle("error bars: one standard error of the mean over clips", fontsize=9)
    return figure


def _comparability_notes(runs: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    notes = []
    flow_methods = {str(run.get("flow_method")) for run in runs.values()}
    if len(flow_methods) > 1:
        notes.append(
            f"runs used different flow methods ({', '.join(sorted(flow_methods))}): motion not comparable"
        )
    for metric in metrics:
        seen = {run.get("extractors", {}).get(metric) for run in runs.values() if metric in run["metrics"]}
        if len(seen) > 1:
            notes.append(
                f"{metric} was computed with different extractors ({', '.join(map(str, seen))}): not comparable"
            )
    return notes
