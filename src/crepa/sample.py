"""Clips from a trained run: the base pipeline of the run, its LoRA (or fully fine-tuned transformer)
and RepVideo gates, final or from one checkpoint, through :mod:`crepa.generation` (the path training
validation takes, so a clip matches the validation clip of the same prompt, seed and step).

    from crepa.sample import sample_run
    manifest = sample_run("runs/my_run", ["a cat surfing"], seeds=[0, 1], out="runs/my_run/samples")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from peft import set_peft_model_state_dict
from torch import nn

from crepa import repvideo
from crepa.config import RunConfig
from crepa.eval.videos import IMAGE_SUFFIXES, natural_key
from crepa.generation import (
    SAMPLE_OPTIONS,
    VALIDATION_KEYS,
    ClipRequest,
    GenerationSettings,
    generate_clips,
    load_pipeline,
    shape_problems,
    write_clips,
)
from crepa.models import ModelFamily
from crepa.models.loading import load_transformer, resolve_family
from crepa.models.pipelines import _DTYPE_KWARG
from crepa.rundir import TRANSFORMER_DIR
from crepa.runs import RunDirectoryError, read_run_config, read_transformer_weights
from crepa.train.lora import add_lora


@dataclass
class RunPipeline:
    """A run's pipeline ready to generate: ``pipeline.transformer`` carries the trained weights."""

    pipeline: Any
    config: RunConfig
    family: ModelFamily
    run_dir: Path
    checkpoint: str | None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_run_transformer(
    run_dir: str | Path, config: RunConfig, family: ModelFamily, checkpoint: str | None, dtype: torch.dtype
) -> nn.Module:
    """The run's transformer on the CPU: base + LoRA (as peft layers, like in training), or the fully
    fine-tuned weights, plus its RepVideo gates when the run trained them. Frozen, eval mode."""

    run_dir = Path(run_dir)
    tensors = read_transformer_weights(run_dir, config, checkpoint)
    if tensors is None:  # finished full fine-tuning: the saved folder
        transformer_class = getattr(diffusers, family.class_names[0])
        transformer = transformer_class.from_pretrained(run_dir / TRANSFORMER_DIR, **{_DTYPE_KWARG: dtype})
    else:
        transformer = load_transformer(config, family, dtype)
        if config.lora.enabled:
            add_lora(transformer, family, config.lora)
            result = set_peft_model_state_dict(transformer, tensors)
            missing = [key for key in result.missing_keys if "lora_" in key]
            if missing or result.unexpected_keys:
                raise RunDirectoryError(
                    f"{run_dir}: the LoRA does not fit the run's lora settings (missing {missing[:3]}, "
                    f"unexpected {list(result.unexpected_keys)[:3]})"
                )
        else:
            _, unexpected = transformer.load_state_dict(tensors, strict=False)  # buffers are not saved
            if unexpected or not tensors:
                raise RunDirectoryError(
                    f"{run_dir}: checkpoint tensors do not fit the transformer ({unexpected[:3]})"
                )
    transformer.requires_grad_(False).eval()
    if config.repvideo.enabled:
        repvideo.load(transformer, run_dir, checkpoint)
    return transformer


def load_run_pipeline(
    run_dir: str | Path,
    checkpoint: str | None = None,
    *,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    offload: bool = False,
    vae_tiling: bool = False,
    **components: Any,
) -> RunPipeline:
    """The run's pipeline with its trained transformer (final, or ``checkpoint`` like ``"step-000750"``).

    dtype: default the run's ``model.dtype`` on ``device``. offload / vae_tiling: see
    :func:`crepa.generation.load_pipeline`; ``components`` replace parts of the base pipeline.
    """

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    family = resolve_family(config)
    target = resolve_device(device)
    dtype = dtype or config.model.torch_dtype(target)
    transformer = load_run_transformer(run_dir, config, family, checkpoint, dtype)
    pipeline = load_pipeline(
        config.model,
        family,
        transformer,
        device=target,
        offload=offload,
        vae_tiling=vae_tiling,
        **components,
    )
    return RunPipeline(pipeline, config, family, run_dir, checkpoint)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file not found (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts in this file (one prompt per line)")
    return prompts


def first_frames(directory: str | Path, count: int) -> list[Path]:
    """The images of ``directory`` in natural name order, one per prompt (``count`` of them)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a folder of first-frame images")
    images = sorted(
        (p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: natural_key(p.name),
    )
    if len(images) != count:
        raise ValueError(
            f"{directory}: {len(images)} images for {count} prompts; give one first frame per prompt "
            "(matched in name order)"
        )
    return images


def requests_for(
    prompts: Sequence[str], seeds: Sequence[int], images: Sequence[Path] | None = None
) -> list[tuple[str, ClipRequest]]:
    """(file stem, request) per (prompt, seed): prompt-major, stems ``prompt-K-seed-S``."""
    return [
        (f"prompt-{index}-seed-{seed}", ClipRequest(prompt, seed, None if images is None else images[index]))
        for index, prompt in enumerate(prompts)
        for seed in seeds
    ]


def sample_pipeline(
    run: RunPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    settings: GenerationSettings,
    *,
    images: Sequence[Path] | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> Path:
    """Generate every (prompt, seed) with a loaded run and write clips, contact sheet and
    ``samples.jsonl`` into ``out``; returns the manifest path."""
    named = requests_for(prompts, seeds, images)
    clips = generate_clips(
        run.pipeline,
        run.family,
        [request for _, request in named],
        settings,
        batch_size=batch_size,
        progress=progress,
    )
    extra = {"run": str(run.run_dir), "checkpoint": run.checkpoint or "final"}
    stems = (stem for stem, _ in named)
    return write_clips(Path(out), zip(stems, clips, strict=True), settings, extra=extra)


def sample_run(
    run_dir: str | Path,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    checkpoint: str | None = None,
    images: Sequence[Path] | None = None,
    batch_size: int = 1,
    device: str = "auto",
    offload: bool = False,
    vae_tiling: bool = False,
    progress: bool = False,
    components: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """``crepa sample`` as a function: load the run (:func:`load_run_pipeline`), generate one clip per
    (prompt, seed) with the run's validation settings, overridden by ``overrides`` (num_frames,
    height, width, inference_steps, guidance_scale, fps, negative_prompt), write them to ``out``.
    Returns ``out/samples.jsonl``.

    A clip shape the model cannot generate raises ``ValueError`` naming the limit and the option
    before any clip is sampled. Unset in the run file, the shape is the run's first training bucket."""
    if not prompts or not seeds:
        raise ValueError("give at least one prompt and one seed")
    run = load_run_pipeline(
        run_dir,
        checkpoint,
        device=device,
        offload=offload,
        vae_tiling=vae_tiling,
        **(components or {}),
    )
    settings = GenerationSettings.from_validation(run.config.validation, **overrides)
    names = {
        field: option
        if overrides.get(field) is not None
        else f"{option} (default: the run's {VALIDATION_KEYS[field]})"
        for field, option in SAMPLE_OPTIONS.items()
    }
    problems = shape_problems(run.family, run.pipeline.transformer, settings, names)
    if problems:
        raise ValueError("cannot generate this clip shape: " + "; ".join(problems))
    return sample_pipeline(
        run, prompts, seeds, out, settings, images=images, batch_size=batch_size, progress=progress
    )
