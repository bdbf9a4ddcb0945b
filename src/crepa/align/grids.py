"""Token grids: block outputs as (B, F', H', W', C), teacher grids resampled in 2-D, pixel frames to latent frames."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

FrameReduce = Literal["mean", "first", "last", "center"]
FRAME_REDUCES: tuple[str, ...] = ("mean", "first", "last", "center")


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, F'*H'*W', C) frame-major, row-major tokens -> (B, F', H', W', C)."""
    frames, height, width = grid
    if tokens.ndim != 3 or tokens.shape[1] != frames * height * width:
        raise ValueError(
            f"block output of shape {tuple(tokens.shape)} does not hold a {frames}x{height}x{width} "
            f"token grid (expected (B, {frames * height * width}, C))"
        )
    return tokens.unflatten(1, (frames, height, width))


def resample_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a feature grid (B, F, h, w, D) to (B, F, H, W, D) in 2-D.

    Shrinking axes are area-averaged, growing axes bilinearly interpolated (shrink first, so a
    mixed case never interpolates before averaging). Rows and columns are never mixed up, unlike
    1-D interpolation of the flattened sequence.
    """
    if grid.ndim != 5:
        raise ValueError(f"expected a teacher grid (B, F, h, w, D), got shape {tuple(grid.shape)}")
    batch, frames, h, w, dim = grid.shape
    target_h, target_w = size
    if (h, w) == (target_h, target_w):
        return grid
    maps = grid.reshape(batch * frames, h, w, dim).permute(0, 3, 1, 2)  # (B*F, D, h, w)
    shrunk = (min(h, target_h), min(w, target_w))
    if shrunk != (h, w):
        maps = F.adaptive_avg_pool2d(maps, shrunk)
    if shrunk != (target_h, target_w):
        maps = F.interpolate(maps, size=(target_h, target_w), mode="bilinear", align_corners=False)
    return maps.permute(0, 2, 3, 1).reshape(batch, frames, target_h, target_w, dim)


def valid_frame_counts_near(
    num_frames: int, temporal_ratio: int, count: int = 2, latent_multiple: int = 1
) -> list[int]:
    """Lengths 1 + r*m closest to ``num_frames`` whose 1 + m latent frames are a multiple of
    ``latent_multiple`` (a temporal patch, e.g. 2 for CogVideoX 1.5: 81 -> 77, 85); for error messages."""
    m = max(0, (num_frames - 1) // temporal_ratio)
    window = (count + 1) * latent_multiple
    candidates = {
        1 + temporal_ratio * k
        for k in range(max(0, m - window), m + window + 1)
        if (1 + k) % latent_multiple == 0
    }
    return sorted(candidates, key=lambda t: (abs(t - num_frames), t))[:count]


def latent_frame_features(
    features: torch.Tensor, temporal_ratio: int, reduce: FrameReduce = "mean"
) -> torch.Tensor:
    """Pixel-frame features (B, T, ..., D), T = 1 + r*m -> latent-frame features (B, 1 + m, ..., D).

    Latent frame 0 is pixel frame 0; latent frame f >= 1 reduces pixel frames r(f-1)+1 .. rf
    ("center" takes the frame at index r // 2 inside that group).
    """
    if temporal_ratio < 1:
        raise ValueError(f"temporal_ratio must be >= 1, got {temporal_ratio}")
    num_frames = features.shape[1]
    if (num_frames - 1) % temporal_ratio != 0:
        near = " or ".join(str(t) for t in valid_frame_counts_near(num_frames, temporal_ratio))
        raise ValueError(
            f"{num_frames} frames cannot be split into latent frames: with temporal compression "
            f"{temporal_ratio} a clip needs 1 + {temporal_ratio}*m frames (nearest valid: {near})"
        )
    first = features[:, :1]
    if num_frames == 1:
        return first
    groups = features[:, 1:].unflatten(1, (-1, temporal_ratio))  # (B, m, r, ..., D)
    if reduce == "mean":
        rest = groups.mean(dim=2)
    elif reduce == "first":
        rest = groups[:, :, 0]
    elif reduce == "last":
        rest = groups[:, :, -1]
    elif reduce == "center":
        rest = groups[:, :, temporal_ratio // 2]
    else:
        raise ValueError(f"reduce must be one of {FRAME_REDUCES}, got {reduce!r}")
    return torch.cat([first, rest], dim=1)
