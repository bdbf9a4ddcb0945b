"""``crepa eval``: temporal consistency, motion and distribution distance of a folder of clips;
``crepa eval --compare``: several finished runs side by side; ``crepa eval --diagnostics``: a
training run's per-layer similarity and CKNNA, base model and LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_CONFIG, command_errors, fail
from crepa.eval.names import DEFAULT_EXTRACTORS, EXTRACTOR_KINDS, FLOW_METHODS, METRICS

METRICS_HELP = (
    "Comma-separated or repeated; default all per-clip metrics. A consistency metric brings the motion "
    f"metrics along (a frozen clip maximises consistency). From: {', '.join(METRICS)}."
)
EXTRACTOR_HELP = (
    "SPEC for every feature metric, or METRIC=SPEC (repeatable). SPEC is KIND[:DIR_OR_HUB_ID] with KIND in "
    f"{', '.join(EXTRACTOR_KINDS[:-1])}, or py:module:factory. Defaults: "
    + ", ".join(f"{metric}={spec}" for metric, spec in DEFAULT_EXTRACTORS.items())
)


def split_values(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values, flattened."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


@app.command("eval")
def eval_(
    paths: list[Path] | None = typer.Argument(
        None,
        help="VIDEOS_DIR (mp4/gif/webm files or frame folders); with --compare, two or more run folders.",
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
    diagnostics: Path | None = typer.Option(
        None,
        "--diagnostics",
        help="Run file (TOML) of a training run: per-layer adjacent-frame similarity and CKNNA of its model "
        "on its cached clips, instead of evaluating videos.",
    ),
    lora: Path | None = typer.Option(
        None, "--lora", help="With --diagnostics: a LoRA to compare with the base."
    ),
    clips: int = typer.Option(8, "--clips", min=1, help="With --diagnostics: cached clips to use."),
    draws: int = typer.Option(2, "--draws", min=1, help="With --diagnostics: noise levels drawn per clip."),
    block: int | None = typer.Option(None, "--block", min=0, help="With --diagnostics: block for CKNNA."),
    k: int = typer.Option(10, "--k", min=1, help="With --diagnostics: neighbours of CKNNA."),
    seed: int = typer.Option(0, "--seed", help="With --diagnostics: seed of the noise draws."),
) -> None:
    """Measure generated videos (consistency, motion, distance to real clips), compare runs, or diagnose a model."""
    console, errors = Console(), Console(stderr=True)
    paths = paths or []
    import_component_modules()
    written = (out, "no partial report was left (each report file is written whole or not at all)")
    with command_errors(errors, lambda: written):
        try:
            if diagnostics is not None:
                if paths or compare:
                    raise ValueError(
                        "--diagnostics reads the run file only: give no VIDEOS_DIR and no --compare"
                    )
                _diagnose(console, diagnostics, out, lora, clips, draws, block, k, seed, device)
            elif compare:
                _compare(console, paths, out)
            else:
                _evaluate(
                    console, paths, out, reference, metrics, extractor, flow, device, batch_size, progress
                )
        except ValueError as error:
            fail(errors, "error", str(error), EXIT_CONFIG)


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
    import torch

    from crepa.data.report import DataReport
    from crepa.eval.evaluate import evaluate_clips, extractor_specs, load_extractors, resolve_metrics
    from crepa.eval.report import SKIPPED_FILE, write_eval_report
    from crepa.eval.videos import find_clips
    from crepa.models.loading import describe_device

    if len(paths) != 1:
        raise ValueError(
            f"give one VIDEOS_DIR (got {len(paths)} paths); to put runs side by side add --compare"
        )
    if flow not in FLOW_METHODS:
        raise ValueError(f"--flow must be one of {', '.join(FLOW_METHODS)}, got {flow!r}")
    videos_dir = paths[0]
    chosen = resolve_metrics(split_values(metrics) or None, with_reference=reference is not None)
    listing, reference_listing = DataReport(), DataReport()
    clips = find_clips(videos_dir, listing, given_as="VIDEOS_DIR")
    if not clips:
        raise ValueError(
            f"{videos_dir}: no videos (mp4, gif, webm, mov, mkv, avi, ...) or frame folders found"
        )
    reference_clips = (
        find_clips(reference, reference_listing, given_as="--reference") if reference is not None else []
    )
    if reference is not None and not reference_clips:
        raise ValueError(f"--reference {reference}: no videos or frame folders found")
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
        report=listing,
        reference_report=reference_listing,
    )
    write_eval_report(out, result, videos_dir=videos_dir, reference_dir=reference)
    if not result.clips:
        counts = ", ".join(f"{problem}: {count}" for problem, count in listing.problem_counts().items())
        raise ValueError(
            f"{videos_dir}: none of its {len(clips)} clip(s) could be read ({counts}); each file and "
            f"its reason is in {out / SKIPPED_FILE}"
        )

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
            console.print(f"[yellow]{label} {len(skipped)} unreadable file(s):[/yellow]")
            for item in skipped:
                console.print(f"  {item.path}: {item.reason}", markup=False, highlight=False, soft_wrap=True)
    skipped_note = f" (skipped files in {SKIPPED_FILE})" if result.skipped or result.reference_skipped else ""
    console.print(
        f"{len(result.clips)} clips evaluated on {describe_device(device)}; report in {out}{skipped_note}"
    )


def _compare(console: Console, paths: list[Path], out: Path) -> None:
    from crepa.eval.report import write_comparison

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


def _diagnose(
    console: Console,
    run_file: Path,
    out: Path,
    lora: Path | None,
    clips: int,
    draws: int,
    block: int | None,
    k: int,
    seed: int,
    device: str,
) -> None:
    import torch

    from crepa.config import load_config
    from crepa.eval.diagnostics import diagnose_run
    from crepa.eval.report import write_layer_report

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = load_config(run_file)
    result = diagnose_run(
        config, lora=lora, clips=clips, draws=draws, block_index=block, k=k, seed=seed, device=device
    )
    details = {
        "run_file": str(run_file),
        "lora": str(lora) if lora is not None else None,
        "block_index": result.block_index,
        "samples": result.samples,
        "timesteps": result.timesteps,
        "notes": result.notes,
    }
    write_layer_report(out, result.profiles, result.cknna, details)
    table = Table(
        "model", "mean similarity", "first block", "last block", f"CKNNA (block {result.block_index})"
    )
    for label, profile in result.profiles.items():
        score = result.cknna.get(label)
        table.add_row(
            label,
            _number(sum(profile) / len(profile)),
            _number(profile[0]),
            _number(profile[-1]),
            "-" if score is None else _number(score),
        )
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"{result.samples} forward calls per model; layers.json and layers.png in {out}")
