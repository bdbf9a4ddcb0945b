"""The demo's teacher: a tiny DINOv2 (transformers ``Dinov2Model``) trained self-supervised on
single frames of the generic split, by masked patch prediction (as iBOT / MAE): a random half of
the patch tokens is replaced by the mask token and a linear head predicts those patches' pixels.

Saved with ``save_pretrained`` (the head is dropped) and loaded by training through
:func:`crepa.teachers.load_teacher`, like DINOv2 from the hub.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from crepa.demo.artefacts import build_once
from crepa.demo.fitting import fit
from crepa.demo.world import RenderedSplit
from crepa.teachers.vit import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class TeacherSettings:
    """Architecture and training of the tiny teacher (patch 8 on 32x32 frames: a 4x4 grid)."""

    patch_size: int = 8
    hidden_size: int = 48
    layers: int = 3
    heads: int = 3
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    mask_ratio: float = 0.5
    seed: int = 0


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), ImageNet-normalised as the teacher loader does."""
    pixels = frames.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p * W/p, 3 * p * p), patches row-major like the ViT's tokens."""
    batch, channels, height, width = images.shape
    grid = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return grid.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)


def train_teacher(
    frames: np.ndarray, image_size: int, settings: TeacherSettings, progress: bool = True
) -> Dinov2Model:
    """Masked patch prediction on uint8 frames (N, H, W, 3); returns the trained backbone."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    config = Dinov2Config(
        image_size=image_size,
        patch_size=settings.patch_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        mlp_ratio=2,
    )
    model = Dinov2Model(config)
    patch_values = 3 * settings.patch_size**2
    head = nn.Linear(settings.hidden_size, patch_values)
    images = torch.from_numpy(frames)
    tokens = (image_size // settings.patch_size) ** 2

    def batch_loss() -> torch.Tensor:
        pick = torch.randint(len(images), (settings.batch_size,), generator=generator)
        batch = normalise_frames(images[pick])
        flip = torch.rand(settings.batch_size, generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        masked = torch.rand(settings.batch_size, tokens, generator=generator) < settings.mask_ratio
        hidden = model(pixel_values=batch, bool_masked_pos=masked).last_hidden_state[:, 1:]
        target = patchify(batch, settings.patch_size)
        target = (target - target.mean(-1, keepdim=True)) / (target.std(-1, keepdim=True) + 1e-6)
        return F.mse_loss(head(hidden)[masked], target[masked])

    model.train()
    parameters = [*model.parameters(), *head.parameters()]
    fit(
        parameters,
        batch_loss,
        settings.steps,
        settings.lr,
        "teacher (masked patches)",
        progress,
        weight_decay=0.05,
    )
    return model.eval()


def build_teacher(
    directory: Path, split: RenderedSplit, settings: TeacherSettings, upstream: dict, progress: bool = True
) -> bool:
    """Train on ``split``'s frames and save the teacher in ``directory`` unless it is there already;
    returns whether it was reused."""

    def build(staging: Path) -> None:
        model = train_teacher(split.frames, split.settings.size, settings, progress)
        model.save_pretrained(staging)

    return build_once(directory, {"teacher": asdict(settings), **upstream}, build)
