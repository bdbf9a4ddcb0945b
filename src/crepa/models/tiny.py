"""Tiny configurations of every registered family (the sizes diffusers uses in its own unit tests).

Used by the tests, the benchmarks and the demo; they build in milliseconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from torch import nn

from crepa.models.registry import get_family

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "cogvideox": dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=8,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    ),
    "wan": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
}


def tiny_transformer(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised tiny transformer of ``family`` (fp32, eval mode off)."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; available: {', '.join(TINY_CONFIGS)}")
    cls = getattr(diffusers, get_family(family).class_names[0])
    torch.manual_seed(seed)
    return cls(**{**TINY_CONFIGS[family], **overrides})
