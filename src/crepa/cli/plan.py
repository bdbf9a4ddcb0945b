"""``crepa plan RUN_FILE``: will the run fit the GPU, and the fastest memory setting that does."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_FAILURE, command_errors, fail

if TYPE_CHECKING:
    from crepa.plan.memory import Estimate

SHOWN = 12


def _row(estimate: Estimate, depth: int) -> list[str]:
    from crepa.plan.memory import GIB

    settings = estimate.settings
    return [
        f"{settings.checkpointed_blocks}/{depth}",
        str(settings.offload_blocks),
        settings.base_precision,
        settings.optimizer,
        "yes" if settings.offload_activations else "no",
        f"{estimate.gpu_peak / GIB:.1f}",
        f"{estimate.peak / GIB:.1f}",
        f"{estimate.weights / GIB:.1f}",
        f"{estimate.activations / GIB:.1f}",
        f"{estimate.step_flops / 1e12:,.0f}",
        f"{estimate.seconds:.2f}",
    ]


@app.command()
def plan(
    config: str | None = typer.Argument(None, help="The run file (TOML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.batch_size=2."),
    gpu_memory: str = typer.Option(
        "80GiB", "--gpu-memory", help="Memory of one GPU, e.g. 24GiB, 48GiB, 80GB."
    ),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs the run shards over with FSDP (1: one GPU)."),
    markdown: bool = typer.Option(
        False, "--markdown", help="Print the README's table of the published models instead (no RUN_FILE)."
    ),
) -> None:
    """Predict the peak GPU memory and step time of CONFIG's training step (offline: config only, no
    weights) and print the fastest memory settings that fit, as --set lines for `crepa train`."""
    from crepa.config import load_config
    from crepa.plan.memory import CUDA_ACTIVATION_FACTOR, GIB
    from crepa.plan.planner import HEADROOM_BYTES, OPTION_PENALTY, parse_memory, plan_run, published_table

    import_component_modules()
    if markdown:
        typer.echo(published_table())
        return
    console = Console()
    if config is None:
        fail(console, "error", "RUN_FILE is missing (or use --markdown for the published models' table)", 2)
    if not console.is_terminal:  # piped: full rows rather than an 80-column wrap
        console = Console(width=160)
    with command_errors(console, lambda: (None, "nothing was written")):
        run = load_config(config, set_)
        budget = parse_memory(gpu_memory)
        result = plan_run(run, budget, gpus)
    depth = result.profile.depth
    batch, _, frames, height, width = result.workload.latent_shape
    console.print(
        f"{result.workload.class_name}, {depth} blocks, batch {batch} of {frames}x{height}x{width} latents; "
        f"budget {budget / GIB:.1f} GiB per GPU x {gpus} (fits: peak + {HEADROOM_BYTES / GIB:.1f} GiB headroom)",
        highlight=False,
        soft_wrap=True,
    )
    columns = [
        "ckpt blocks",
        "offload",
        "weights",
        "optimizer",
        "act. offload",
        "GPU peak GiB",
        "traced peak GiB",
        "weights GiB",
        "activ. GiB",
        "TFLOP",
        "s/step*",
    ]
    current = Table(*columns, title="the run file's settings")
    current.add_row(*_row(result.current, depth))
    console.print(current)
    fitting = result.fitting()
    if not fitting:
        smallest = min(result.candidates, key=lambda e: e.gpu_peak)
        fail(
            console,
            "does not fit",
            f"no setting fits {budget / GIB:.1f} GiB; the smallest needs {smallest.gpu_peak / GIB:.1f} GiB "
            f"({', '.join(smallest.settings.set_lines(depth))}). Lower train.batch_size, data.num_frames or "
            "data.resolutions, or shard over more GPUs (--gpus)",
            EXIT_FAILURE,
        )
    table = Table(
        *columns,
        title=f"fitting settings, fastest first, each memory option in use (fp8, 8-bit moments, offload) "
        f"counted {OPTION_PENALTY:.0%} slower ({len(fitting)}, {min(SHOWN, len(fitting))} shown)",
    )
    for estimate in fitting[:SHOWN]:
        table.add_row(*_row(estimate, depth))
    console.print(table)
    console.print(
        "GPU peak: the traced peak (CPU autocast) with activations x "
        f"{CUDA_ACTIVATION_FACTOR:.2f} for CUDA autocast's fp32 ops (SPEC §7); "
        "* step time at the H200 rate of SPEC §7 (341 TFLOP/s): compare settings, not cards."
    )
    fastest = " ".join(f"--set '{line}'" for line in fitting[0].settings.set_lines(depth))
    console.print(f"fastest that fits:\n  crepa train {config} {fastest}", highlight=False, soft_wrap=True)
