"""Optical flow (OpenCV, no learned weights), warping error and motion measures.

Flow convention: ``flow[p] = (dx, dy)`` in pixels such that ``source(p) ~ target(p + flow[p])``.
OpenCV computes one frame pair per call, so :func:`optical_flow` loops over pairs; everything
else is vectorised over pairs and pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from crepa.eval.names import FLOW_METHODS, FlowMethod

# Forward-backward consistency (Sundaram et al. 2010, as used for video style transfer by Ruder et
# al. 2016): a pixel is occluded when |w_f + w_b|^2 > alpha (|w_f|^2 + |w_b|^2) + beta.
OCCLUSION_ALPHA = 0.01
OCCLUSION_BETA = 0.5


def _check_frames(frames: np.ndarray, name: str) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 RGB frames (P, H, W, 3), got {frames.dtype} {frames.shape}")


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (P, H, W, 3) -> uint8 luma (P, H, W) with the BT.601 weights OpenCV uses."""
    luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def optical_flow(sources: np.ndarray, targets: np.ndarray, method: FlowMethod = "dis") -> np.ndarray:
    """Dense flow from each source frame to its target: uint8 (P, H, W, 3) twice -> float32 (P, H, W, 2).

    "dis": OpenCV's DIS flow (medium preset); "farneback": Farneback's polynomial expansion.
    """
    _check_frames(sources, "sources")
    _check_frames(targets, "targets")
    if sources.shape != targets.shape:
        raise ValueError(f"sources {sources.shape} and targets {targets.shape} must have the same shape")
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

        def pair_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return dis.calc(a, b, None)
    elif method == "farneback":

        def pair_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 15, 3, 5, 1.2, 0)
    else:
        raise ValueError(f"flow method must be one of {FLOW_METHODS}, got {method!r}")
    gray_sources, gray_targets = to_gray(sources), to_gray(targets)
    flows = [pair_flow(a, b) for a, b in zip(gray_sources, gray_targets, strict=True)]
    return np.stack(flows).astype(np.float32, copy=False)


def warp(images: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``images`` at p + flow[p], bilinearly: (P, H, W, C) and (P, H, W, 2) -> (P, H, W, C).

    Also returns where p + flow[p] lies inside the image, a bool (P, H, W); outside, the warped
    value is 0.
    """
    pairs, height, width = flow.shape[:3]
    if images.shape[:3] != (pairs, height, width):
        raise ValueError(f"images {images.shape} and flow {flow.shape} disagree on (P, H, W)")
    ys, xs = np.meshgrid(
        np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
    )
    x = xs + flow[..., 0]
    y = ys + flow[..., 1]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    # grid_sample with align_corners=True maps -1 / +1 to the centres of the border pixels.
    grid = np.stack([2 * x / max(width - 1, 1) - 1, 2 * y / max(height - 1, 1) - 1], axis=-1)
    maps = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    warped = F.grid_sample(
        maps, torch.from_numpy(grid), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return warped.permute(0, 2, 3, 1).numpy() * inside[..., None], inside


def consistent_flow_mask(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels whose forward flow is confirmed by the backward flow (not occluded, not leaving the frame).

    forward: flow t -> t+1, backward: flow t+1 -> t, both (P, H, W, 2). Returns bool (P, H, W).
    """
    backward_at_target, inside = warp(backward, forward)
    mismatch = np.square(forward + backward_at_target).sum(-1)
    scale = np.square(forward).sum(-1) + np.square(backward_at_target).sum(-1)
    return inside & (mismatch <= OCCLUSION_ALPHA * scale + OCCLUSION_BETA)


def warping_errors(
    frames: np.ndarray, next_frames: np.ndarray, forward: np.ndarray, backward: np.ndarray
) -> np.ndarray:
    """Warping error of each pair: the next frame flow-warped onto the frame, masked, mean squared difference.

    frames, next_frames: uint8 (P, H, W, 3); forward / backward flows (P, H, W, 2) between them.
    Pixels are scaled to [0, 1]; the mean runs over the consistent pixels and the channels.
    Returns float64 (P,); NaN for a pair without a single consistent pixel.
    """
    warped, _ = warp(next_frames.astype(np.float32) / 255.0, forward)
    mask = consistent_flow_mask(forward, backward)
    squared = np.square(warped - frames.astype(np.float32) / 255.0).mean(-1, dtype=np.float64)
    counts = mask.sum(axis=(1, 2))
    totals = (squared * mask).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan)


def flow_magnitude(flow: np.ndarray) -> np.ndarray:
    """Per-pixel flow length in pixels: (P, H, W, 2) -> (P, H, W)."""
    return np.sqrt(np.square(flow).sum(-1))


def top_magnitude(flow: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Mean of the largest ``fraction`` of each pair's flow magnitudes (VBench: top 5%): (P, H, W, 2) -> (P,)."""
    magnitudes = flow_magnitude(flow).reshape(flow.shape[0], -1)
    count = int(magnitudes.shape[1] * fraction)
    if count < 1:
        raise ValueError(f"fraction {fraction} of {magnitudes.shape[1]} pixels keeps no pixel")
    return -np.partition(-magnitudes, count - 1, axis=1)[:, :count].mean(axis=1, dtype=np.float64)


def dynamic_frame_stride(fps: float) -> int:
    """VBench's frame stride for the dynamic degree: keep about 8 frames per second (1 when fps is unknown)."""
    return max(1, round(fps / 8)) if fps > 0 else 1


def dynamic_threshold(height: int, width: int) -> float:
    """Top-5% flow magnitude (pixels) above which a pair counts as moving: 6 px at a 256-pixel short side."""
    return 6.0 * min(height, width) / 256.0


def is_dynamic(top_magnitudes: np.ndarray, height: int, width: int, num_frames: int) -> bool:
    """VBench's decision for one clip: at least round(4 * num_frames / 16) pairs above the threshold.

    top_magnitudes: (P,) of the pairs of the (stride-subsampled) clip of ``num_frames`` frames.
    As in VBench, a clip with at least one pair and a required count of 0 (num_frames <= 2) is dynamic.
    """
    required = round(4 * num_frames / 16)
    moving = int((np.asarray(top_magnitudes) > dynamic_threshold(height, width)).sum())
    return len(top_magnitudes) > 0 and moving >= required


@dataclass(frozen=True)
class ClipMotion:
    """Flow-based measures of one clip.

    warping_error: mean over consecutive pairs of :func:`warping_errors` (NaN if not computed).
    flow_magnitude: mean flow length in pixels per frame over consecutive pairs and pixels.
    dynamic: VBench's dynamic-degree decision, on frames subsampled to about 8 fps.
    """

    warping_error: float
    flow_magnitude: float
    dynamic: bool


def consecutive_pairs(frames: np.ndarray, pairs_per_chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(frames[t], frames[t + 1]) for all t, as chunks of at most ``pairs_per_chunk`` pairs (P, H, W, 3) each."""
    for start in range(0, len(frames) - 1, pairs_per_chunk):
        stop = min(start + pairs_per_chunk, len(frames) - 1)
        yield frames[start:stop], frames[start + 1 : stop + 1]


def clip_motion(
    frames: np.ndarray, fps: float, method: FlowMethod = "dis", warping: bool = True, pairs_per_chunk: int = 8
) -> ClipMotion:
    """Flow of every consecutive pair (forward, plus backward when ``warping``) of uint8 frames (T, H, W, 3).

    The dynamic degree needs its own flows when the clip is faster than 12 fps (VBench's stride > 1).
    Pairs are processed ``pairs_per_chunk`` at a time to bound memory on long, large clips.
    """
    _check_frames(frames, "frames")
    num_frames, height, width = frames.shape[:3]
    if num_frames < 2:
        raise ValueError(f"motion needs at least 2 frames, got {num_frames}")
    stride = dynamic_frame_stride(fps)
    errors, magnitudes, tops = [], [], []
    for current, following in consecutive_pairs(frames, pairs_per_chunk):
        forward = optical_flow(current, following, method)
        if warping:
            errors.append(
                warping_errors(current, following, forward, optical_flow(following, current, method))
            )
        magnitudes.append(flow_magnitude(forward).mean(axis=(1, 2), dtype=np.float64))
        if stride == 1:
            tops.append(top_magnitude(forward))
    subsampled = frames[::stride]
    if stride > 1:
        tops = [
            top_magnitude(optical_flow(a, b, method))
            for a, b in consecutive_pairs(subsampled, pairs_per_chunk)
        ]
    pair_errors = np.concatenate(errors) if errors else np.array([np.nan])
    return ClipMotion(
        warping_error=float(np.nanmean(pair_errors)) if np.isfinite(pair_errors).any() else float("nan"),
        flow_magnitude=float(np.concatenate(magnitudes).mean()),
        dynamic=is_dynamic(np.concatenate(tops) if tops else np.array([]), height, width, len(subsampled)),
    )
