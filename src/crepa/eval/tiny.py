"""Tiny random extractor checkpoints (DINO ViT, CLIP, DINOv2, VideoMAE) for tests, benchmarks and the demo.

Built from configs in milliseconds and saved with ``save_pretrained``, so they load through the
same code as real weights (``dino:DIR``, ``clip:DIR``, ...); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def tiny_extractor_models() -> dict[str, nn.Module]:
    """Randomly initialised (seed 0) tiny models: "dino" (ViT), "clip" (full CLIP), "dinov2", "videomae"."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        VideoMAEConfig,
        VideoMAEModel,
        ViTConfig,
        ViTModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    text = dict(**small, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {
            "dino": ViTModel(ViTConfig(**small, image_size=32, patch_size=16), add_pooling_layer=False),
            "clip": CLIPModel(
                CLIPConfig(
                    text_config=text,
                    vision_config=dict(**small, image_size=32, patch_size=16),
                    projection_dim=24,
                )
            ),
            "dinov2": Dinov2Model(Dinov2Config(**small, image_size=28, patch_size=14)),
            "videomae": VideoMAEModel(
                VideoMAEConfig(**small, image_size=32, patch_size=16, num_frames=4, tubelet_size=2)
            ),
        }


def save_tiny_extractors(directory: str | Path) -> dict[str, Path]:
    """Save :func:`tiny_extractor_models` under ``directory``; returns kind -> checkpoint folder."""
    paths = {}
    for kind, model in tiny_extractor_models().items():
        paths[kind] = Path(directory) / kind
        model.save_pretrained(paths[kind])
    return paths
