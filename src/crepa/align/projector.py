"""The trainable projector h_phi that maps student hidden states into the teacher's feature space."""

from __future__ import annotations

from typing import Literal

from torch import nn

ProjectorKind = Literal["mlp", "linear"]
PROJECTOR_KINDS: tuple[str, ...] = ("mlp", "linear")


def build_projector(kind: ProjectorKind, in_dim: int, out_dim: int, hidden_dim: int = 2048) -> nn.Module:
    """Per-token projector, applied on the last dimension of (..., in_dim) tensors.

    "mlp": REPA's Linear-SiLU-Linear-SiLU-Linear (hidden_dim wide). "linear": LayerNorm + Linear.
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
    raise ValueError(f"projector must be one of {PROJECTOR_KINDS}, got {kind!r}")
