"""Exact frame sampling by timestamps: resample a clip to a target fps, with stride and start offset.

A clip's frames are given by their presentation times (seconds, ascending), read from the file
(container frame counts and fps can lie). Sampled frame k is the frame nearest to time
``t0 + start + k * stride / target_fps`` (ties go to the earlier frame), where t0 is the first
frame's time; without a target fps, frame k is the (k * stride)-th frame at or after t0 + start.
A clip covers the time up to its last frame plus one frame interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_EPS = 1e-6  # seconds: timestamps closer than this are equal


class ClipTooShortError(ValueError):
    """The clip cannot supply the requested frames."""


def uniform_timestamps(num_frames: int, fps: float) -> np.ndarray:
    """Timestamps (num_frames,) of a clip with a constant frame rate, starting at 0."""
    return np.arange(num_frames, dtype=np.float64) / fps


def _coverage_end(timestamps: np.ndarray) -> float:
    interval = float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 0.0
    return float(timestamps[-1]) + max(interval, 2 * _EPS) - _EPS


def _first_index_at(timestamps: np.ndarray, time: float) -> int:
    return int(np.searchsorted(timestamps, time - _EPS, side="left"))


def _as_timestamps(timestamps: Sequence[float] | np.ndarray) -> np.ndarray:
    times = np.asarray(timestamps, dtype=np.float64)
    if times.ndim != 1 or len(times) == 0:
        raise ValueError("timestamps must be a non-empty 1-D sequence")
    if np.any(np.diff(times) < 0):
        raise ValueError("timestamps must be in ascending (presentation) order")
    return times


def _check(target_fps: float | None, stride: int, start: float) -> None:
    if target_fps is not None and target_fps <= 0:
        raise ValueError(f"target_fps must be positive, got {target_fps}")
    if stride < 1 or start < 0:
        raise ValueError(f"stride must be >= 1 and start >= 0, got {stride} and {start}")


def available_frame_count(
    timestamps: Sequence[float] | np.ndarray,
    target_fps: float | None = None,
    stride: int = 1,
    start: float = 0.0,
) -> int:
    """How many frames the clip can supply with this sampling (see the module docstring)."""
    _check(target_fps, stride, start)
    times = _as_timestamps(timestamps)
    origin = times[0] + start
    if target_fps is None:
        remaining = len(times) - _first_index_at(times, origin)
        return max(0, math.ceil(remaining / stride))
    step = stride / target_fps
    span = _coverage_end(times) - origin
    if span <= 0:
        return 0
    candidates = origin + np.arange(math.ceil(span / step) + 1) * step
    return int(np.count_nonzero(candidates < _coverage_end(times)))


def sample_frame_indices(
    timestamps: Sequence[float] | np.ndarray,
    num_frames: int,
    target_fps: float | None = None,
    stride: int = 1,
    start: float = 0.0,
) -> list[int]:
    """Indices into ``timestamps`` of ``num_frames`` frames sampled at ``target_fps`` (None: the
    source's own frames), every ``stride``-th sampled frame, from ``start`` seconds into the clip.

    Indices repeat when the target fps exceeds the source's. Raises :class:`ClipTooShortError`
    when the clip cannot supply ``num_frames`` frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    times = _as_timestamps(timestamps)
    available = available_frame_count(times, target_fps, stride, start)
    if available < num_frames:
        raise ClipTooShortError(
            f"needs {num_frames} frames, the clip supplies {available} "
            f"({len(times)} frames over {_coverage_end(times) - times[0]:.2f}s)"
        )
    origin = times[0] + start
    if target_fps is None:
        first = _first_index_at(times, origin)
        return [first + k * stride for k in range(num_frames)]
    if len(times) == 1:
        return [0] * num_frames
    targets = origin + np.arange(num_frames) * (stride / target_fps)
    right = np.clip(np.searchsorted(times, targets, side="left"), 1, len(times) - 1)
    left = right - 1
    take_left = targets - times[left] <= times[right] - targets + _EPS
    return np.where(take_left, left, right).tolist()
