"""Validation during training: clips for the configured prompts from the transformer as it is now
(LoRA, RepVideo gates), through :mod:`crepa.generation` — the same path as ``crepa sample``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from crepa.config import RunConfig
from crepa.generation import ClipRequest, GenerationSettings, generate_clips, load_pipeline, write_clips
from crepa.models import ModelFamily
from crepa.rundir import step_name


def validation_requests(config: RunConfig) -> list[ClipRequest]:
    """Prompt K of ``[validation]`` starts from the noise of seed ``validation.seed + K`` (and, for
    image-to-video models, from the first frame ``validation.images[K]``)."""
    settings = config.validation
    images = settings.images or [None] * len(settings.prompts)
    return [
        ClipRequest(prompt, settings.seed + index, image)
        for index, (prompt, image) in enumerate(zip(settings.prompts, images, strict=True))
    ]


def run_validation(
    config: RunConfig, family: ModelFamily, transformer: nn.Module, root: Path, step: int
) -> Path:
    """Write ``root/step-XXXXXX/prompt-K.{mp4,gif}``, ``contact_sheet.png`` and ``samples.jsonl``;
    returns the directory."""
    settings = GenerationSettings.from_validation(config.validation)
    pipeline = load_pipeline(config.model, family, transformer)
    clips = generate_clips(pipeline, family, validation_requests(config), settings)
    named = ((f"prompt-{index}", clip) for index, clip in enumerate(clips))
    directory = root / step_name(step)
    write_clips(directory, named, settings, extra={"step": step})
    return directory
