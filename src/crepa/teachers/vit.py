"""Shared machinery of ViT teachers: normalisation, chunked frozen forward, patch tokens to a grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class ViTTeacher(nn.Module):
    """A frozen ViT as a :class:`~crepa.teachers.Teacher`; subclasses implement :meth:`encode_tokens`.

    ``__call__(frames (B, 3, H, W) in [0, 1]) -> (B, H/p, W/p, D)`` float32: frames are normalised
    with ``mean`` / ``std``, run through the model ``chunk_size`` at a time without gradients (bf16
    autocast on CUDA when ``autocast``), and the ``num_prefix_tokens`` leading tokens (CLS,
    registers) are dropped, leaving the patch tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        dim: int,
        patch_size: int,
        num_prefix_tokens: int,
        mean: Sequence[float],
        std: Sequence[float],
        chunk_size: int = 16,
        autocast: bool = True,
    ):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.dim = dim
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> ViTTeacher:
        """A teacher stays in eval mode (dropout off, frozen statistics) whatever the caller asks."""
        return super().train(False)

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> all output tokens (B, prefix + H/p * W/p, D)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1], H and W multiples of the patch size -> (B, H/p, W/p, D)."""
        if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
            raise ValueError(f"expected float frames (B, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        height, width = frames.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"{self.name}: frame size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; choose it with crepa.teachers.teacher_input_size"
            )
        grid = (height // self.patch_size, width // self.patch_size)
        return torch.cat([self._encode_chunk(chunk, grid) for chunk in frames.split(self.chunk_size)])

    def _encode_chunk(self, frames: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pixels = (frames.to(self.device, torch.float32) - self.mean) / self.std
        use_autocast = self.autocast and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_autocast):
            tokens = self.encode_tokens(pixels.to(self._model_dtype()))
        patches = tokens[:, self.num_prefix_tokens :]
        if patches.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(
                f"{self.name}: {patches.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid; "
                f"wrong number of prefix tokens ({self.num_prefix_tokens})?"
            )
        return patches.float().unflatten(1, grid)

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
