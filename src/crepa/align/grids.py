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


def frames_kept_by(num_frames: int, temporal_ratio: int, reduce: FrameReduce) -> list[int] | None:
    """Indices of the pixel frames that ``reduce`` keeps, one per latent frame; None for "mean" (all).

    Latent frame 0 is pixel frame 0; latent frame f >= 1 stands for pixel frames r(f-1)+1 .. rf, of
    which "first" keeps r(f-1)+1, "last" rf and "center" r(f-1)+1 + r//2. A caller that encodes
    frames can encode only these (an r-fold saving) and skip the reduction.
    """
    if temporal_ratio < 1:
        raise ValueError(f"temporal_ratio must be >= 1, got {temporal_ratio}")
    if (num_frames - 1) % temporal_ratio != 0:
        near = " or ".join(str(t) for t in valid_frame_counts_near(num_frames, temporal_ratio))
        raise ValueError(
            f"{num_frames} frames cannot be split into latent frames: with temporal compression "
            f"{temporal_ratio} a clip needs 1 + {temporal_ratio}*m frames (nearest valid: {near})"
        )
    offsets = {"mean": None, "first": 0, "last": temporal_ratio - 1, "center": temporal_ratio // 2}
    if reduce not in offsets:
        raise ValueError(f"reduce must be one of {FRAME_REDUCES}, got {reduce!r}")
    offset = offsets[reduce]
    if offset is None:
        return None
    return [0, *range(1 + offset, num_frames, temporal_ratio)]


def latent_frame_features(
    features: torch.Tensor, temporal_ratio: int, reduce: FrameReduce = "mean"
) -> torch.Tensor:
    """Pixel-frame features (B, T, ..., D), T = 1 + r*m -> latent-frame features (B, 1 + m, ..., D).

    Latent frame 0 is pixel frame 0; latent frame f >= 1 reduces pixel frames r(f-1)+1 .. rf: their
    mean, or the one frame :func:`frames_kept_by` names ("first", "last", "center" = index r // 2
    inside the group).
    """
    kept = frames_kept_by(features.shape[1], temporal_ratio, reduce)
    if kept is not None:
        return features[:, kept]
    first = features[:, :1]
    if features.shape[1] == 1:
        return first
    groups = features[:, 1:].unflatten(1, (-1, temporal_ratio))  # (B, m, r, ..., D)
    return torch.cat([first, groups.mean(dim=2)], dim=1)
