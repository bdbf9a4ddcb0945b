"""The teacher protocol: any frozen image encoder that maps frames to a grid of patch features."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    """A frozen image encoder: frames (B, 3, H, W) float RGB in [0, 1] -> patch grid (B, H/p, W/p, D).

    H and W are multiples of ``patch_size``; ``dim`` is D. ``name`` identifies the weights and
    preprocessing (it goes into cache keys). Any callable with these attributes can be a teacher;
    an optional ``device`` attribute tells callers where to put the frames.
    """

    name: str
    dim: int
    patch_size: int

    def __call__(self, frames: torch.Tensor) -> torch.Tensor: ...
