"""``crepa precompute CONFIG``: fill the cache with latents, text embeddings and teacher grids."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_CONFIG, command_errors, fail, terminate_like_interrupt


@app.command()
def precompute(
    config: Path = typer.Argument(..., help="Run file (TOML); the same file `crepa train` reads."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a key, e.g. --set data.fps=16 (repeatable)."
    ),
    prune: bool = typer.Option(False, help="Delete shard files that no entry of this run uses."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Compute every clip's VAE latents, text embeddings and teacher grid once; a rerun resumes."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from crepa.config import load_config
    from crepa.precompute import precompute as run_precompute

    import_component_modules()
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=console)])
    logging.getLogger("crepa").setLevel(logging.INFO)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    run = None

    def state() -> tuple[Path | None, str]:
        if run is None:
            return None, "nothing was written"
        return run.cache.dir, "finished shards are kept; run crepa precompute again to resume"

    with command_errors(console, state), terminate_like_interrupt():
        run = load_config(config, overrides)
        summary = run_precompute(run, prune=prune, progress=progress)
    if summary.rank == 0:
        for line in summary.lines():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if summary.samples == 0:
            fail(
                console,
                "error",
                f"no clip of the data could be used ({', '.join(str(s.path) for s in run.data.dataset_sources())}); "
                "nothing to train on. See the "
                "skipped files above",
                EXIT_CONFIG,
            )
