"""``crepa export RUN_DIR --format diffusers|comfyui|merged --out PATH``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_CONFIG, fail


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Output folder of a `crepa train` run."),
    out: Path = typer.Option(
        ..., "--out", help="Folder (diffusers, merged) or .safetensors file / folder (comfyui)."
    ),
    format_: str = typer.Option("diffusers", "--format", help="diffusers, comfyui or merged."),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="e.g. step-000750; default the final weights."
    ),
    keys: str = typer.Option(
        "peft", "--keys", help="comfyui key names: peft (lora_A / lora_B) or kohya (lora_down / lora_up)."
    ),
    eval_dir: Path | None = typer.Option(
        None,
        "--eval",
        help="A `crepa eval` folder for the model card's table; default RUN_DIR/eval if present.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Write the run's LoRA (or merged transformer) for diffusers, ComfyUI / kohya-style tools, or
    from_pretrained, with RepVideo gates beside it and a hub model card (README.md)."""
    from crepa.export import export_run
    from crepa.models.hub import HubUnreachableError
    from crepa.runs import RunDirectoryError

    import_component_modules()
    console = Console(stderr=True)
    if keys not in ("peft", "kohya"):
        fail(console, "error", f"--keys {keys!r}: choose peft or kohya", EXIT_CONFIG)
    try:
        written = export_run(
            run_dir,
            out,
            format_,
            checkpoint=checkpoint,
            key_style=keys,
            eval_dir=eval_dir,
            overwrite=overwrite,
        )
    except (RunDirectoryError, FileNotFoundError, FileExistsError, ValueError, HubUnreachableError) as error:
        fail(console, "error", str(error), EXIT_CONFIG)
    console.print(f"exported {format_} to {written}", highlight=False)
