"""Validation during training: sample clips for the configured prompts with the family's diffusers
pipeline and the transformer as it is now (LoRA active), saved as mp4 + GIF + one contact sheet."""

from __future__ import annotations

import inspect
from pathlib import Path

import diffusers
import numpy as np
import torch
from torch import nn

from crepa.config import RunConfig
from crepa.io.video import write_video
from crepa.models import ModelFamily
from crepa.models.pipelines import text_length


def contact_sheet(clips: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """One image (rows = clips, columns = evenly spaced frames) from uint8 clips (T, H, W, 3)."""
    height, width = clips[0].shape[1:3]
    rows = []
    for clip in clips:
        picks = np.linspace(0, len(clip) - 1, num=min(columns, len(clip))).round().astype(int)
        row = np.zeros((height, width * columns, 3), dtype=np.uint8)
        for slot, index in enumerate(picks):
            row[:, slot * width : (slot + 1) * width] = clip[index][:height, :width]
        rows.append(row)
    return np.concatenate(rows, axis=0)


@torch.no_grad()
def run_validation(
    config: RunConfig, family: ModelFamily, transformer: nn.Module, root: Path, step: int
) -> Path:
    """Write ``root/step-XXXXXX/prompt-K.{mp4,gif}`` and ``contact_sheet.png``; returns the directory."""
    import cv2  # only needed here

    settings = config.validation
    pipeline_class = getattr(diffusers, family.pipeline_class)
    parameter = next(transformer.parameters())
    pipeline = pipeline_class.from_pretrained(
        config.model.pretrained,
        transformer=transformer,
        revision=config.model.revision,
        torch_dtype=parameter.dtype,
    ).to(parameter.device)
    pipeline.set_progress_bar_config(disable=True)
    was_training = transformer.training
    transformer.eval()
    directory = root / f"step-{step:06d}"
    options = {}
    if "max_sequence_length" in inspect.signature(pipeline.__call__).parameters:
        options["max_sequence_length"] = text_length(family, transformer.config)  # CogVideoX fixes it
    clips = []
    try:
        for index, prompt in enumerate(settings.prompts):
            generator = torch.Generator(device="cpu").manual_seed(settings.seed + index)
            frames = pipeline(
                prompt=prompt,
                num_frames=settings.num_frames,
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=generator,
                output_type="np",
                **options,
            ).frames[0]
            clip = (np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8)
            clip = clip[:, : clip.shape[1] // 2 * 2, : clip.shape[2] // 2 * 2]  # mp4 wants even sizes
            write_video(directory / f"prompt-{index}.mp4", clip, fps=settings.fps)
            write_video(directory / f"prompt-{index}.gif", clip, fps=settings.fps)
            clips.append(clip)
    finally:
        transformer.train(was_training)
    if clips:
        sheet = contact_sheet(clips)
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        if ok:
            tmp = directory / ".contact_sheet.png.tmp"
            tmp.write_bytes(encoded.tobytes())
            tmp.replace(directory / "contact_sheet.png")
    return directory
