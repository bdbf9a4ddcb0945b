"""``crepa plan RUN_FILE``: will the run fit the GPU, and the fastest memory setting that does."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_DOES_NOT_FIT, command_errors, fail

if TYPE_CHECKING:
    from crepa.plan.memory import Estimate

SHOWN = 12
# Where the GPU factor and the step rate come from, for the user to read.
MEASURED = 'docs/benchmarks.md, "Memory options and `crepa plan`"'
FSDP_CONFIG = "examples/accelerate/fsdp.yaml"


def _row(estimate: Estimate, depth: int) -> list[str]:
    from crepa.plan.memory import GIB
    from crepa.plan.planner import ranking_seconds

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
        f"{ranking_seconds(estimate):.2f}",
    ]


def train_command(config: str, set_lines: list[str], gpus: int) -> str:
    """The command that trains ``config`` with ``set_lines`` the way the plan assumed: ``crepa train``
    on one GPU, else FSDP2 over ``gpus`` processes with the shipped accelerate config (README)."""
    launcher = (
        "crepa train"
        if gpus == 1
        else f"accelerate launch --config_file {FSDP_CONFIG} --num_processes {gpus} -m crepa train"
    )
    return " ".join([launcher, shlex.quote(config), *(f"--set {shlex.quote(line)}" for line in set_lines)])


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
    from crepa.plan.memory import ACHIEVED_FLOPS, CUDA_ACTIVATION_FACTOR, GIB
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
        "predicted s/step*",
        "ranked s/step",
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
            EXIT_DOES_NOT_FIT,
        )
    table = Table(
        *columns,
        title=f"fitting settings by ranked s/step, fastest first: s/step + {OPTION_PENALTY:.0%} per memory "
        f"option in use (fp8, 8-bit moments, offload) ({len(fitting)}, {min(SHOWN, len(fitting))} shown)",
    )
    for estimate in fitting[:SHOWN]:
        table.add_row(*_row(estimate, depth))
    console.print(table)
    console.print(
        "GPU peak: the traced peak (CPU autocast) with activations x "
        f"{CUDA_ACTIVATION_FACTOR:.2f} for CUDA autocast's fp32 ops, as measured on an H200 (CogVideoX-5B "
        f"LoRA step: 9.71 GiB above the weights); * predicted step time at the {ACHIEVED_FLOPS / 1e12:.0f} "
        f"TFLOP/s that step reached there: compare settings, not cards. Both: {MEASURED}.",
        highlight=False,
    )
    fastest = train_command(config, fitting[0].settings.set_lines(depth), gpus)
    console.print(f"fastest that fits:\n  {fastest}", highlight=False, soft_wrap=True)
