"""Teacher grids for a training batch, from wherever the run keeps them.

``teacher_source`` (``cache.teacher_source`` in the run file):

- "cache": the grids precomputed by ``crepa precompute`` (the default; no encoder in the step);
- "pixels": encode the clean frames the data loader decoded (``CachedDataset(frames=True)``);
- "vae": decode the cached latents with the VAE first, for caches that hold only latents.

All three call :func:`crepa.teachers.clip_teacher_grid` on the same clip, so they agree (up to
float16 storage, and the VAE's reconstruction error in "vae" mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from crepa.align.grids import FrameReduce
from crepa.models.pipelines import decode_latents
from crepa.teachers import Teacher, clip_teacher_grid

TeacherSource = Literal["cache", "pixels", "vae"]
TEACHER_SOURCES: tuple[str, ...] = ("cache", "pixels", "vae")


def teacher_targets(
    source: TeacherSource,
    batch: Mapping[str, Any],
    student_grid: tuple[int, int, int],
    temporal_ratio: int,
    *,
    teacher: Teacher | None = None,
    vae: nn.Module | None = None,
    reduce: FrameReduce = "mean",
    max_pixels: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Teacher grids (B, F', H', W', D) of a batch from :class:`~crepa.cache.CachedDataset`.

    student_grid: (F' latent frames, H', W') of the batch's bucket. "cache" reads
    ``batch["teacher"]`` (float16 as stored); "pixels" encodes ``batch["frames"]`` (B, T, 3, H, W)
    in [0, 1] with ``teacher``; "vae" decodes ``batch["latents"]`` (B, C, F, h, w) with ``vae``
    (one clip at a time) and encodes the frames with ``teacher``.
    """
    if source == "cache":
        if "teacher" not in batch:
            raise ValueError(
                "teacher_source 'cache': the batch has no 'teacher' grids; precompute them or use 'pixels'"
            )
        return batch["teacher"]
    if teacher is None:
        raise ValueError(f"teacher_source {source!r} needs the teacher model (crepa.teachers.load_teacher)")
    if source == "pixels":
        if "frames" not in batch:
            raise ValueError(
                "teacher_source 'pixels': the batch has no 'frames'; build CachedDataset(frames=True)"
            )
        clips = list(batch["frames"])
    elif source == "vae":
        if vae is None:
            raise ValueError("teacher_source 'vae' needs the VAE (crepa.models.pipelines.load_components)")
        clips = [
            decode_latents(vae, latents[None])[0].transpose(0, 1).add(1).div(2)
            for latents in batch["latents"]
        ]
    else:
        raise ValueError(f"teacher_source must be one of {TEACHER_SOURCES}, got {source!r}")
    grids = [
        clip_teacher_grid(
            teacher, clip, student_grid, temporal_ratio, reduce, max_pixels=max_pixels, chunk_size=chunk_size
        )
        for clip in clips
    ]
    return torch.stack(grids)
