"""``crepa train CONFIG``: fine-tune with CREPA from the precomputed cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_FAILURE, EXIT_SIGNAL, command_errors, fail
from crepa.rundir import CHECKPOINTS_DIR, checkpoint_dirs

if TYPE_CHECKING:
    from crepa.config import RunConfig
    from crepa.train.state import TrainingSummary


def main_process() -> bool:
    """Whether this is rank 0 of the launch (or the only process): the one that reports."""
    return int(os.environ.get("RANK", "0")) == 0


def closing_line(summary: TrainingSummary) -> str:
    """What ``crepa train`` says at the end: the steps of this run (after a resume, which ones), its
    time, or that the run was already finished."""
    where = f"outputs in {summary.output_dir}"
    max_steps = summary.config["train"]["max_steps"]
    if summary.steps == summary.start_step:
        return (
            f"nothing to train: the run was already at step {summary.steps} (train.max_steps = {max_steps}); "
            f"raise train.max_steps to train further; {where}"
        )
    trained = summary.steps - summary.start_step
    if summary.start_step == 0:
        steps = f"{summary.steps} steps"
    elif trained == 1:
        steps = f"step {summary.steps} (1 this run)"
    else:
        steps = f"steps {summary.start_step + 1}-{summary.steps} ({trained} this run)"
    seconds = f"{summary.seconds:.1f}s" if summary.seconds < 10 else f"{summary.seconds:.0f}s"
    processes = f" x {summary.processes} processes" if summary.processes > 1 else ""
    return f"done: {steps} in {seconds} on {summary.device}{processes}; {where}"


def predicted_memory_warning(run: RunConfig) -> str | None:
    """On a GPU, rank 0: the memory model's warning when the run will not fit the GPU's free memory
    (crepa.plan; config only, no weights). None on the CPU, on other ranks, or when the model's config
    cannot be read here (the trainer's own checks report that)."""
    import torch

    from crepa.config import ConfigError

    if not torch.cuda.is_available() or not main_process():
        return None
    from crepa.plan.planner import memory_warning

    free, _ = torch.cuda.mem_get_info()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    try:
        return memory_warning(run, free, int(os.environ.get("WORLD_SIZE", "1")) if fsdp else 1)
    except ConfigError:
        return None


@app.command()
def train(
    config: str = typer.Argument(..., help="The run file (TOML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.max_steps=2000."),
    resume: str | None = typer.Option(
        None,
        help="'latest' (the newest checkpoint; an error if there is none), 'auto' (the newest, or a fresh "
        "start when there is none) or a checkpoint directory.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Fine-tune the model of CONFIG (LoRA or full) with the alignment loss; resumable, multi-GPU via accelerate."""
    import torch

    from crepa.config import load_config
    from crepa.train.parallel import exit_process

    import_component_modules()
    try:
        console = Console(stderr=True)
        run: RunConfig | None = None

        def state() -> tuple[Path | None, str]:
            if run is None:
                return None, "nothing was written"
            found = checkpoint_dirs(run.output.dir / CHECKPOINTS_DIR)
            if not found:
                return run.output.dir, "no checkpoint was written yet"
            return run.output.dir, f"checkpoints up to {found[-1]} are intact; resume with --resume latest"

        with command_errors(console, state):
            run = load_config(config, set_)
            from crepa.train.recipe import train as run_training
            from crepa.train.state import TrainingStopped

            warning = predicted_memory_warning(run)
            if warning is not None:
                console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)

            try:
                summary = run_training(run, resume=resume, progress=progress)
            except TrainingStopped as error:
                fail(console, "training stopped", f"{error} {state()[1]}", EXIT_FAILURE)
            except torch.OutOfMemoryError as error:
                fail(
                    console,
                    "out of memory",
                    f"{error}\nTo use less memory: lower train.batch_size (use train.gradient_accumulation "
                    "instead), keep model.gradient_checkpointing = true, lower lora.rank, use fewer data.num_frames "
                    "or smaller data.resolutions, train.mixed_precision = 'bf16', crepa.projector = 'linear'.",
                    EXIT_FAILURE,
                )
        if summary.stop_signal is not None:
            fail(
                console,
                f"stopped by {summary.stop_signal}",
                f"{summary.steps} steps; checkpoint {summary.checkpoint} saved; resume with --resume latest",
                EXIT_SIGNAL[summary.stop_signal],
            )
        if main_process():  # every process of a launch gets here with the same summary
            console.print(closing_line(summary), highlight=False, soft_wrap=True)
    except typer.Exit as end:
        exit_process(end.exit_code)  # multi-process runs end here (see crepa.train.parallel.exit_process)
        raise
    exit_process(0)
