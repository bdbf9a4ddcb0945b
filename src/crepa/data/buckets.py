"""Buckets: the frame count and the resolution a clip is brought to."""

from __future__ import annotations

import math
from collections.abc import Sequence


def choose_frame_bucket(available: int, buckets: Sequence[int]) -> int | None:
    """The largest bucket (a frame count) the clip can supply, or None when it is too short for all."""
    fitting = [count for count in buckets if count <= available]
    return max(fitting) if fitting else None


def choose_resolution_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest to ``size``'s (in log ratio; first on ties)."""
    if not buckets:
        raise ValueError("no resolution buckets configured")
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))
