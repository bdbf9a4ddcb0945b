"""``crepa experiment RUN_FILE``: does alignment help on my data? Variants x seeds of one run file,
trained, sampled and evaluated alike, with a verdict from paired per-seed statistics."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_CONFIG, EXIT_FAILURE, command_errors, fail


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"3"`` -> (0, 1, 2); ``"0,4,7"`` -> (0, 4, 7)."""
    from crepa.config import ConfigError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected a count (3) or a list of seeds (0,4,7), got {text!r}") from None
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise ConfigError(f"--seeds: the count must be 1 or more, got {values[0]}")
        return tuple(range(values[0]))
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"--seeds: give distinct seeds, got {text!r}")
    return tuple(values)


def parse_margins(values: list[str]) -> dict[str, float]:
    """``["subject_consistency=0.002", ...]`` -> {metric: margin}."""
    from crepa.config import ConfigError

    margins = {}
    for value in values:
        metric, _, number = value.partition("=")
        try:
            margins[metric.strip()] = float(number)
        except ValueError:
            raise ConfigError(
                f"--margin: expected METRIC=VALUE (subject_consistency=0.002), got {value!r}"
            ) from None
    return margins


@app.command()
def experiment(
    run_file: Path = typer.Argument(..., help="The run file (TOML) every variant starts from."),
    variants: str = typer.Option(
        "none,repa,crepa",
        "--variants",
        help="Comma-separated: none, repa, crepa, crepa+repvideo, or NAME=BUILTIN for a variant defined by "
        "its own --set NAME.section.key=value. The first is the baseline of the comparisons.",
    ),
    seeds: str = typer.Option("3", "--seeds", help="Number of seeds (3 = seeds 0,1,2) or a list (0,4,7)."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file, one prompt per line (held-out prompts)."),
    reference: Path | None = typer.Option(
        None, "--reference", help="Folder of real held-out clips: adds the Frechet distance to them."
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override for every variant (train.max_steps=500) or one (crepa.crepa.weight=1.0). Sampling uses "
        "the run file's [validation] settings: --set validation.inference_steps=25 etc.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default runs/experiment-<run file name>)."
    ),
    metrics: list[str] | None = typer.Option(None, "--metrics", help="crepa eval metrics (default: all)."),
    extractor: list[str] | None = typer.Option(
        None,
        "--extractor",
        help="crepa eval --extractor values (SPEC or METRIC=SPEC); never the training teacher.",
    ),
    primary: str | None = typer.Option(
        None,
        "--primary",
        help="Comma-separated metrics the verdict's headline is about, declared before the run (default: the "
        "run file's experiment.primary, else subject_consistency, temporal_flickering, warping_error, "
        "frechet_distance). Holm over pairs x these; every other metric is exploratory (BH q-values).",
    ),
    margin: list[str] = typer.Option(
        [],
        "--margin",
        help="METRIC=VALUE: the equivalence margin (metric units) of the TOST reported when no difference is "
        "detected (defaults: subject_consistency, temporal_flickering 0.002; warping_error 0.0005).",
    ),
    base: bool = typer.Option(True, "--base/--no-base", help="Also sample and evaluate the base model."),
    workers: int = typer.Option(
        1, "--workers", min=1, help="Processes for training runs and evaluations (1: one after the other)."
    ),
    processes_per_run: int = typer.Option(
        1,
        "--processes-per-run",
        min=1,
        help="Train each run with `accelerate launch` in K processes (data parallel; train.batch_size is per "
        "process). On CUDA every run gets K GPUs of its own and as many runs go at once as groups of K fit; "
        "on the CPU, --workers runs go at once. 1: runs train in this process (or the --workers pool).",
    ),
    accelerate_config: Path | None = typer.Option(
        None,
        "--accelerate-config",
        help="accelerate config file for the launched runs (e.g. examples/accelerate/fsdp.yaml); its "
        "num_processes is replaced by --processes-per-run.",
    ),
    sample_batch_size: int = typer.Option(1, "--sample-batch-size", min=1, help="Prompts per pipeline call."),
    device: str = typer.Option("auto", "--device", help="Device of the evaluation's feature extractors."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train variants x seeds from RUN_FILE, sample the same prompts and seeds, evaluate, and report a verdict."""
    from crepa.cli.eval import split_values
    from crepa.experiment.lifecycle import ExperimentStopped
    from crepa.experiment.report import terminal_table, write_report
    from crepa.experiment.runfiles import parse_variants
    from crepa.experiment.runner import (
        CrepaEvaluator,
        ExperimentSpec,
        read_prompt_file,
        run_experiment,
    )
    from crepa.train.state import TrainingStopped

    import_component_modules()
    console = Console(stderr=True)
    out = (out or Path("runs") / f"experiment-{run_file.stem}").resolve()
    kept = "Finished runs, samples and evaluations are kept; the same command continues from there."
    # ConfigError and an unreachable model hub: exit 2 (command_errors); Ctrl-C: 130; a full disk: 1.
    with command_errors(console, lambda: (out, kept)):
        try:
            chosen, shared = parse_variants(variants, set_)
            spec = ExperimentSpec(
                run_file=run_file,
                out=out,
                variants=chosen,
                seeds=parse_seeds(seeds),
                prompts=read_prompt_file(prompts),
                reference=reference.resolve() if reference is not None else None,
                evaluator=CrepaEvaluator(
                    metrics_requested=tuple(split_values(metrics)) or None,
                    extractors=tuple(split_values(extractor)),
                    device=device,
                ),
                shared_overrides=shared,
                base=base,
                workers=workers,
                sample_batch_size=sample_batch_size,
                processes_per_run=processes_per_run,
                accelerate_config=accelerate_config.resolve() if accelerate_config is not None else None,
                primary=None if primary is None else tuple(split_values([primary])),
                margins=parse_margins(margin),
            )
            results = run_experiment(
                spec, progress=progress, log=lambda text: console.rule(text, style="dim")
            )
        except ValueError as error:
            fail(console, "error", str(error), EXIT_CONFIG)
        except (ExperimentStopped, TrainingStopped) as error:
            fail(console, "stopped", f"{error}\n{kept}", EXIT_FAILURE)
    write_report(results)
    Console().print(terminal_table(results))
    console.print(f"report: {out / 'report.md'} and {out / 'report.html'}", highlight=False)
