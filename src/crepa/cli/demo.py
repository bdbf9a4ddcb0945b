"""``crepa demo``: the embedded default, a complete CREPA experiment on a synthetic video world,
CPU only, nothing downloaded (see :mod:`crepa.demo`)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from crepa.cli import app


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder (artefacts are cached here)."),
    seeds: int | None = typer.Option(
        None, "--seeds", min=1, help="Seeds per variant (default 4; 2 with --quick)."
    ),
    quick: bool = typer.Option(False, "--quick", help="Fewer clips, steps and seeds: about a minute."),
    workers: int = typer.Option(
        min(os.cpu_count() or 1, 4),
        "--workers",
        min=1,
        help="Processes for the fine-tuning runs and evaluations.",
    ),
    world_seed: int = typer.Option(
        0,
        "--world-seed",
        min=0,
        help="Seed of the synthetic world; the clips, teacher, extractor and base model derive from it. "
        "The demo's settings were chosen on world seed 0 only.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run CREPA vs REPA* vs no alignment on a synthetic world and write report.md / report.html."""
    import torch

    from crepa.demo.run import DemoSettings, run_demo
    from crepa.demo.verdict import TERMINAL_METRICS
    from crepa.experiment.report import terminal_table

    torch.set_num_threads(1)  # tiny models: threads cost more than they give (see crepa.experiment.workers)
    settings = DemoSettings.quick() if quick else DemoSettings()
    if seeds is not None:
        settings = replace(settings, seeds=seeds)
    settings = settings.with_world_seed(world_seed)
    results, extras = run_demo(out, settings, workers=workers, progress=progress)
    console = Console()
    shown = [metric for metric in results.metrics if metric.key in TERMINAL_METRICS]
    console.print(terminal_table(replace(results, metrics=shown), extras))
    total = sum(extras.stage_seconds.values()) + sum(results.stage_seconds.values())
    console.print(f"report: {out / 'report.md'} and {out / 'report.html'} ({total:.0f} s in all)")
