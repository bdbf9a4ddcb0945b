"""Synthetic clips shared by the eval tests (this module holds no tests)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch


def textured_image(height: int, width: int, seed: int = 0, blur: float = 2.0) -> np.ndarray:
    """Smooth random colour texture, uint8 (H, W, 3), using the full 0..255 range."""
    noise = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), blur)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).round().astype(np.uint8)


def translating_clip(
    num_frames: int, height: int, width: int, shift: tuple[int, int], seed: int = 0, blur: float = 2.0
) -> np.ndarray:
    """uint8 (T, H, W, 3) whose content moves by shift = (dx, dy) pixels per frame.

    frame[t + 1][y + dy, x + dx] == frame[t][y, x], so the flow from t to t + 1 is (dx, dy).
    """
    dx, dy = shift
    margin_x, margin_y = abs(dx) * num_frames, abs(dy) * num_frames
    big = textured_image(height + 2 * margin_y, width + 2 * margin_x, seed, blur)
    frames = [
        big[margin_y - t * dy : margin_y - t * dy + height, margin_x - t * dx : margin_x - t * dx + width]
        for t in range(num_frames)
    ]
    return np.stack(frames)


def save_tiny_extractors(directory: Path) -> dict[str, Path]:
    """Tiny random DINO ViT, full CLIP, DINOv2 and VideoMAE checkpoints saved under ``directory``.

    Built from configs (nothing is downloaded); loaded back through crepa's real loading code.
    """
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
    torch.manual_seed(0)
    models = {
        "dino": ViTModel(ViTConfig(**small, image_size=32, patch_size=16), add_pooling_layer=False),
        "clip": CLIPModel(
            CLIPConfig(
                text_config=dict(
                    **small, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1
                ),
                vision_config=dict(**small, image_size=32, patch_size=16),
                projection_dim=24,
            )
        ),
        "dinov2": Dinov2Model(Dinov2Config(**small, image_size=28, patch_size=14)),
        "videomae": VideoMAEModel(
            VideoMAEConfig(**small, image_size=32, patch_size=16, num_frames=4, tubelet_size=2)
        ),
    }
    paths = {}
    for kind, model in models.items():
        paths[kind] = directory / kind
        model.save_pretrained(paths[kind])
    return paths
