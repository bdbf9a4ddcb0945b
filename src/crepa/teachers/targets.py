"""Teacher targets of a clip: pixel frames -> teacher grid per latent frame on the student's token grid."""

from __future__ import annotations

import torch

from crepa.align.grids import FrameReduce, frames_kept_by, latent_frame_features, resample_grid
from crepa.data.transforms import resize_frames, to_unit_float
from crepa.teachers.protocol import Teacher
from crepa.teachers.size import teacher_input_size


def clip_teacher_grid(
    teacher: Teacher,
    frames: torch.Tensor,
    student_grid: tuple[int, int, int],
    temporal_ratio: int,
    reduce: FrameReduce = "mean",
    *,
    max_pixels: int | None = None,
    multiple: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Teacher features of one clip on the student's grid: (T, 3, H, W) frames -> (F', H', W', D).

    frames: float RGB in [0, 1] or uint8, T = 1 + r*(F' - 1) pixel frames of the clip, already
    cropped to the student's aspect. They are resized (antialiased) to
    :func:`~crepa.teachers.teacher_input_size` and encoded ``chunk_size`` at a time (default: the
    teacher's own ``chunk_size``, else all at once); pixel frames are reduced to latent frames with
    :func:`~crepa.align.latent_frame_features` (a one-frame ``reduce`` encodes only the frames it
    keeps, :func:`~crepa.align.grids.frames_kept_by`) and the grid resampled to (H', W') in 2-D. The
    precompute cache and the online "pixels" mode both call this, so they agree by construction.
    """
    latent_frames, rows, cols = student_grid
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames (T, 3, H, W), got shape {tuple(frames.shape)}")
    expected = 1 + temporal_ratio * (latent_frames - 1)
    if frames.shape[0] != expected:
        raise ValueError(
            f"{frames.shape[0]} pixel frames for {latent_frames} latent frames; with temporal "
            f"compression {temporal_ratio} the clip needs {expected}"
        )
    kept = frames_kept_by(frames.shape[0], temporal_ratio, reduce)
    if kept is not None:  # the other frames would be encoded only to be dropped
        frames = frames[kept]
    device = getattr(teacher, "device", frames.device)
    chunk_size = chunk_size or getattr(teacher, "chunk_size", None) or frames.shape[0]
    size = teacher_input_size(
        (rows, cols), teacher.patch_size, max_pixels, multiple, teacher_dim=teacher.dim, chunk_size=chunk_size
    )
    features = torch.cat(
        [teacher(resize_frames(to_unit_float(chunk.to(device)), size)) for chunk in frames.split(chunk_size)]
    )  # (T, h, w, D)
    latent = (
        features.unsqueeze(0)
        if kept is not None
        else latent_frame_features(features.unsqueeze(0), temporal_ratio)
    )
    return resample_grid(latent, (rows, cols)).squeeze(0)
