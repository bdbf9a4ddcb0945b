"""``crepa sample RUN_DIR``: clips from a trained run (final weights or a checkpoint)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from crepa.cli import app
from crepa.cli._components import import_component_modules
from crepa.cli._errors import EXIT_CONFIG, EXIT_FAILURE, fail


def parse_seeds(text: str) -> list[int]:
    """``"0,1"`` -> [0, 1]; ``"0-3"`` -> [0, 1, 2, 3]."""
    seeds: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            seeds.extend(range(int(first), int(last) + 1) if dash and first else [int(part)])
        except ValueError:
            raise ValueError(f"--seeds {text!r}: expected integers like 0,1,2 or a range 0-3") from None
    if not seeds:
        raise ValueError("--seeds: give at least one seed, e.g. --seeds 0,1")
    return seeds


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., help="Output folder of a `crepa train` run."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file, one prompt per line."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder; default RUN_DIR/samples/final (or /CHECKPOINT)."
    ),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds (or a range 0-3): one clip each."),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="A checkpoint of the run, e.g. step-000750; default the final weights."
    ),
    images: Path | None = typer.Option(
        None, "--images", help="Folder of first frames, one per prompt in name order (image-to-video)."
    ),
    num_frames: int | None = typer.Option(
        None,
        "--frames",
        min=1,
        help="Frames per clip; default validation.num_frames, else data.num_frames[0].",
    ),
    height: int | None = typer.Option(
        None, "--height", min=8, help="Default validation.height, else the first of data.resolutions."
    ),
    width: int | None = typer.Option(
        None, "--width", min=8, help="Default validation.width, else the first of data.resolutions."
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Inference steps."),
    guidance: float | None = typer.Option(
        None, "--guidance", min=0.0, help="Classifier-free guidance scale."
    ),
    fps: float | None = typer.Option(None, "--fps", min=0.1, help="Frame rate of the written files."),
    negative_prompt: str | None = typer.Option(
        None,
        "--negative-prompt",
        help="Text the clips should not show (used with --guidance above 1); default none.",
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", min=1, help="Clips per pipeline call; halved when GPU memory runs out."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    offload: bool = typer.Option(
        False, "--offload", help="Keep text encoder, transformer and VAE on the CPU until each runs (GPU)."
    ),
    vae_tiling: bool = typer.Option(
        False, "--vae-tiling", help="Decode in tiles: less memory for large clips."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Generate one clip per (prompt, seed) with the run's LoRA and RepVideo gates; mp4 + GIF + contact
    sheet + samples.jsonl (which `crepa eval` reads). Settings default to the run's validation settings."""
    import torch

    from crepa.models.hub import HubUnreachableError
    from crepa.models.loading import describe_device
    from crepa.runs import RunDirectoryError
    from crepa.sample import first_frames, read_prompts, resolve_device, sample_run

    import_component_modules()
    console = Console(stderr=True)
    try:
        prompt_list = read_prompts(prompts)
        seed_list = parse_seeds(seeds)
        image_list = first_frames(images, len(prompt_list)) if images is not None else None
        out = out or run_dir / "samples" / (checkpoint or "final")
        sample_run(
            run_dir,
            prompt_list,
            seed_list,
            out,
            checkpoint=checkpoint,
            images=image_list,
            batch_size=batch_size,
            device=device,
            offload=offload,
            vae_tiling=vae_tiling,
            progress=progress,
            num_frames=num_frames,
            height=height,
            width=width,
            inference_steps=steps,
            guidance_scale=guidance,
            fps=fps,
            negative_prompt=negative_prompt,
        )
    except (RunDirectoryError, FileNotFoundError, ValueError, HubUnreachableError) as error:
        fail(console, "error", str(error), EXIT_CONFIG)
    except torch.OutOfMemoryError as error:
        fail(
            console,
            "out of memory",
            f"{error}\nTo use less memory: --batch-size 1, --offload, --vae-tiling, fewer --frames or a "
            "smaller --height / --width.",
            EXIT_FAILURE,
        )
    clips = len(prompt_list) * len(seed_list)
    where = describe_device(resolve_device(device))
    console.print(
        f"{clips} clips in {out} (on {where}); `crepa eval {out} --out ...` measures them", highlight=False
    )
