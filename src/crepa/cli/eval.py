"""``crepa eval``: temporal consistency, motion and distribution distance of a folder of clips;
``crepa eval --compare``: several finished runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from crepa.cli import app
from crepa.eval.evaluate import DEFAULT_EXTRACTORS, METRICS, evaluate_clips, resolve_metrics
from crepa.eval.extractors import EXTRACTOR_KINDS, FeatureExtractor, load_extractor
from crepa.eval.flow import FLOW_METHODS
from crepa.eval.report import write_comparison, write_eval_report
from crepa.eval.videos import find_clips

METRICS_HELP = f"Comma-separated or repeated; default all per-clip metrics. From: {', '.join(METRICS)}."
EXTRACTOR_HELP = (
    "SPEC for every feature metric, or METRIC=SPEC (repeatable). SPEC is KIND[:DIR_OR_HUB_ID] with KIND in "
    f"{', '.join(EXTRACTOR_KINDS[:-1])}, or py:module:factory. Defaults: "
    + ", ".join(f"{metric}={spec}" for metric, spec in DEFAULT_EXTRACTORS.items())
)


def split_values(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values, flattened."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def extractor_specs(values: list[str], metrics: tuple[str, ...]) -> dict[str, str]:
    """Extractor spec per feature metric in ``metrics``: the defaults, replaced by one bare SPEC
    (for every feature metric), then by METRIC=SPEC entries."""
    specs = {metric: spec for metric, spec in DEFAULT_EXTRACTORS.items() if metric in metrics}
    per_metric: dict[str, str] = {}
    everywhere: list[str] = []
    for value in values:
        name, separator, spec = value.partition("=")
        if separator and name in DEFAULT_EXTRACTORS:
            per_metric[name] = spec
        elif separator and name in METRICS:
            raise ValueError(
                f"--extractor {value}: {name} uses no extractor (these do: {', '.join(DEFAULT_EXTRACTORS)})"
            )
        else:
            everywhere.append(value)
    if len(everywhere) > 1:
        raise ValueError(
            f"give one --extractor SPEC for all metrics, or METRIC=SPEC each; got {', '.join(everywhere)}"
        )
    if everywhere:
        specs = dict.fromkeys(specs, everywhere[0])
    specs.update({metric: spec for metric, spec in per_metric.items() if metric in specs})
    return specs


def load_extractors(specs: dict[str, str], device: str, batch_size: int) -> dict[str, FeatureExtractor]:
    """One extractor instance per distinct spec, shared by the metrics that use it."""
    loaded: dict[str, FeatureExtractor] = {}
    for spec in dict.fromkeys(specs.values()):
        loaded[spec] = load_extractor(spec, device=device, batch_size=batch_size)
    return {metric: loaded[spec] for metric, spec in specs.items()}


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@app.command("eval")
def eval_(
    paths: list[Path] = typer.Argument(
        ..., help="VIDEOS_DIR (mp4/gif/webm files or frame folders); with --compare, two or more run folders."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder for metrics.json, per_video.csv and plots."),
    reference: Path | None = typer.Option(
        None, "--reference", help="Folder of real clips: adds the Frechet distance to them."
    ),
    metrics: list[str] | None = typer.Option(None, "--metrics", help=METRICS_HELP),
    extractor: list[str] | None = typer.Option(None, "--extractor", help=EXTRACTOR_HELP),
    compare: bool = typer.Option(
        False, "--compare", help="Put the finished runs given as PATHS side by side."
    ),
    flow: str = typer.Option("dis", "--flow", help=f"OpenCV optical flow: {', '.join(FLOW_METHODS)}."),
    device: str = typer.Option("auto", "--device", help="Extractor device: auto, cpu, cuda, cuda:1, ..."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Frames per extractor forward."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over clips."),
) -> None:
    """Measure temporal consistency, motion and distance to real clips of generated videos."""
    console = Console()
    try:
        if compare:
            _compare(console, paths, out)
        else:
            _evaluate(console, paths, out, reference, metrics, extractor, flow, device, batch_size, progress)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error


def _evaluate(
    console: Console,
    paths: list[Path],
    out: Path,
    reference: Path | None,
    metrics: list[str] | None,
    extractor: list[str] | None,
    flow: str,
    device: str,
    batch_size: int,
    progress: bool,
) -> None:
    if len(paths) != 1:
        raise ValueError(
            f"give one VIDEOS_DIR (got {len(paths)} paths); to put runs side by side add --compare"
        )
    if flow not in FLOW_METHODS:
        raise ValueError(f"--flow must be one of {', '.join(FLOW_METHODS)}, got {flow!r}")
    videos_dir = paths[0]
    chosen = resolve_metrics(split_values(metrics) or None, with_reference=reference is not None)
    clips = find_clips(videos_dir)
    if not clips:
        raise ValueError(f"{videos_dir}: no videos (mp4, gif, webm, mov, mkv, avi) or frame folders found")
    reference_clips = find_clips(reference) if reference is not None else []
    if reference is not None and not reference_clips:
        raise ValueError(f"{reference}: no reference videos or frame folders found")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    extractors = load_extractors(extractor_specs(split_values(extractor), chosen), device, batch_size)
    result = evaluate_clips(
        clips,
        chosen,
        extractors,
        reference=reference_clips,
        flow_method=flow,
        progress=progress,  # type: ignore[arg-type]
    )
    write_eval_report(out, result, videos_dir=videos_dir, reference_dir=reference)

    table = Table("metric", "value", "± sem", "clips", "extractor", title=f"crepa eval: {videos_dir}")
    for metric, entry in result.summary.items():
        clips_used = entry.get("count", entry.get("clips"))
        table.add_row(
            metric,
            _number(entry["value"]),
            _number(entry.get("sem"), 2),
            str(clips_used),
            entry.get("extractor", ""),
        )
    console.print(table)
    warning = result.summary.get("frechet_distance", {}).get("warning")
    if warning:
        console.print(f"[yellow]warning:[/yellow] frechet_distance: {warning}")
    for label, skipped in (("skipped", result.skipped), ("skipped reference", result.reference_skipped)):
        if skipped:
            console.print(f"[yellow]{label} {len(skipped)} unreadable clip(s):[/yellow]")
            for item in skipped:
                console.print(f"  {item.path}: {item.reason}")
    console.print(f"{len(result.clips)} clips evaluated; report in {out}")


def _compare(console: Console, paths: list[Path], out: Path) -> None:
    content = write_comparison(out, paths)
    runs = list(content["runs"])
    table = Table("metric", *runs, title="crepa eval --compare")
    for metric in content["metrics"][runs[0]]:
        cells = []
        for run in runs:
            entry = content["metrics"][run].get(metric)
            cells.append(
                "-" if entry is None else f"{_number(entry.get('value'))} ± {_number(entry.get('sem'), 2)}"
            )
        table.add_row(metric, *cells)
    console.print(table)
    for note in content["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"comparison in {out}")
