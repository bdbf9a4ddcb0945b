"""``crepa train CONFIG``: fine-tune with CREPA from the precomputed cache."""

from __future__ import annotations

import torch
import typer
from rich.console import Console

from crepa.cli import app
from crepa.cli._errors import EXIT_CONFIG, EXIT_FAILURE, fail
from crepa.config import ConfigError, load_config


@app.command()
def train(
    config: str = typer.Argument(..., help="The run file (TOML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.max_steps=2000."),
    resume: str | None = typer.Option(None, help="'latest' or a checkpoint directory."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
) -> None:
    """Fine-tune the model of CONFIG (LoRA or full) with the alignment loss; resumable, multi-GPU via accelerate."""
    console = Console(stderr=True)
    try:
        run = load_config(config, set_)
        from crepa.train.recipe import TrainingStopped
        from crepa.train.recipe import train as run_training

        summary = run_training(run, resume=resume, progress=not no_progress)
    except ConfigError as error:
        fail(console, "error", str(error), EXIT_CONFIG)
    except TrainingStopped as error:
        fail(console, "training stopped", str(error), EXIT_FAILURE)
    except torch.OutOfMemoryError as error:
        console.print(
            f"[red]out of memory:[/red] {error}\nTo use less memory: lower train.batch_size (use "
            "train.gradient_accumulation instead), keep model.gradient_checkpointing = true, lower lora.rank, "
            "use fewer data.num_frames or smaller data.resolutions, train.mixed_precision = 'bf16', "
            "crepa.projector = 'linear'.",
            highlight=False,
        )
        raise typer.Exit(1) from None
    state = "stopped early" if summary.interrupted else "done"
    console.print(
        f"{state}: {summary.steps} steps in {summary.seconds:.0f}s; outputs in {summary.output_dir}",
        highlight=False,
    )
