"""Frame tensors: uint8 to [0, 1] floats, antialiased resizing, resize + centre-crop to a bucket."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_unit_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float32 in [0, 1]; floating frames are returned as they are."""
    if frames.dtype == torch.uint8:
        return frames.float().div_(255.0)
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or floating point, got {frames.dtype}")
    return frames


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) float -> (N, 3, *size), bilinear with antialiasing (no-op at the same size)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)


def cover_size(source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Smallest size with ``source``'s aspect that covers ``target`` (so a centre crop gives ``target``)."""
    scale = max(target[0] / source[0], target[1] / source[1])
    return max(target[0], round(source[0] * scale)), max(target[1], round(source[1] * scale))


def resize_center_crop(
    frames: np.ndarray | torch.Tensor, size: tuple[int, int], chunk_size: int = 16
) -> torch.Tensor:
    """Frames (T, H, W, 3) uint8 -> (T, 3, *size) float32 in [0, 1]: resized to cover ``size``
    without changing their aspect, then centre-cropped. ``chunk_size`` frames are resized at once."""
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    height, width = size
    resized = cover_size((frames.shape[1], frames.shape[2]), size)
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    out = torch.empty(frames.shape[0], 3, height, width)
    for start in range(0, frames.shape[0], chunk_size):
        chunk = to_unit_float(frames[start : start + chunk_size].permute(0, 3, 1, 2))
        out[start : start + chunk_size] = resize_frames(chunk, resized)[
            ..., top : top + height, left : left + width
        ]
    return out
