"""Temporal flickering (VBench): how little consecutive frames differ, pixel by pixel."""

from __future__ import annotations

import numpy as np


def temporal_flickering(frames: np.ndarray) -> float:
    """(255 - mean absolute difference of consecutive frames) / 255 for uint8 frames (T, H, W, C).

    The mean runs over all frame pairs, pixels and channels (every pair has the same size, so this
    equals VBench's mean over pairs of the per-pair mean). 1 means a frozen clip.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 2 or frames.dtype != np.uint8:
        raise ValueError(
            f"temporal flickering needs uint8 frames (T, H, W, C) with T >= 2, got {frames.dtype} {frames.shape}"
        )
    mean_abs_diff = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(dtype=np.float64)
    return float((255.0 - mean_abs_diff) / 255.0)
