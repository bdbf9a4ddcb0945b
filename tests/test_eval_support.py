"""Synthetic clips shared by the eval tests (this module holds no tests)."""

from __future__ import annotations

import cv2
import numpy as np


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
