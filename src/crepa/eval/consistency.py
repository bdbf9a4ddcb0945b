"""Subject and background consistency: VBench's formula on any per-frame features.

VBench scores a clip by comparing every frame t >= 1 with the previous frame and with the first
frame: s_t = 1/2 [max(0, cos(f_{t-1}, f_t)) + max(0, cos(f_0, f_t))] (0-based t here; VBench writes
t >= 2 with 1-based frames). Subject consistency uses DINO ViT-B/16 CLS features, background
consistency CLIP image features; the formula is the same, only the extractor differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def consistency_pair_scores(features: torch.Tensor) -> torch.Tensor:
    """Per-frame scores s_t of one clip: features (T, D) -> (T - 1,) for t = 1 .. T-1, in [0, 1]."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"consistency needs per-frame features (T, D) with T >= 2, got shape {tuple(features.shape)}"
        )
    unit = F.normalize(features.double(), dim=-1)
    to_previous = (unit[1:] * unit[:-1]).sum(-1).clamp(min=0)
    to_first = (unit[1:] * unit[:1]).sum(-1).clamp(min=0)
    return (to_previous + to_first) / 2


def consistency_score(features: torch.Tensor) -> float:
    """One clip's consistency: the mean of :func:`consistency_pair_scores` (VBench's per-video value)."""
    return float(consistency_pair_scores(features).mean())
