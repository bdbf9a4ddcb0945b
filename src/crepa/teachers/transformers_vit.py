"""Teachers from transformers: DINOv2 (with or without registers), CLIP and SigLIP vision towers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crepa.teachers.vit import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ViTTeacher,
)


@dataclass(frozen=True)
class TowerKind:
    """How to load and read one kind of transformers vision tower.

    prefix_tokens: number of tokens before the patch tokens, from the model's config.
    forward_kwargs: extra arguments of the model's forward (e.g. position-embedding interpolation).
    """

    model_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prefix_tokens: Callable[[Any], int]
    forward_kwargs: tuple[tuple[str, Any], ...] = ()


TOWER_KINDS: dict[str, TowerKind] = {
    # DINOv2 interpolates its position embeddings to any (h, w) grid on its own.
    "dinov2": TowerKind("Dinov2Model", IMAGENET_MEAN, IMAGENET_STD, lambda config: 1),
    "dinov2_with_registers": TowerKind(
        "Dinov2WithRegistersModel",
        IMAGENET_MEAN,
        IMAGENET_STD,
        lambda config: 1 + int(config.num_register_tokens),
    ),
    "clip": TowerKind(
        "CLIPVisionModel", CLIP_MEAN, CLIP_STD, lambda config: 1, (("interpolate_pos_encoding", True),)
    ),
    "siglip": TowerKind(
        "SiglipVisionModel", SIGLIP_MEAN, SIGLIP_STD, lambda config: 0, (("interpolate_pos_encoding", True),)
    ),
}

# transformers ``model_type`` (full model or vision tower) -> tower kind.
MODEL_TYPES: dict[str, str] = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_with_registers",
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
}


class TransformersTeacher(ViTTeacher):
    """A transformers vision model whose ``last_hidden_state`` holds [prefix tokens, patch tokens]."""

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any], **kwargs: Any):
        super().__init__(model, **kwargs)
        self.forward_kwargs = forward_kwargs

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels, **self.forward_kwargs).last_hidden_state


def teacher_id(kind: str, name_or_path: str | os.PathLike) -> str:
    """``kind:identifier`` for cache keys: a hub id as given, a local directory as an absolute path."""
    path = Path(name_or_path)
    identifier = path.resolve().as_posix() if path.exists() else str(name_or_path)
    return f"{kind}:{identifier}"


def load_transformers_teacher(
    name_or_path: str | os.PathLike,
    kind: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int = 16,
    autocast: bool = True,
) -> TransformersTeacher:
    """Load a tower of ``kind`` (a key of :data:`TOWER_KINDS`) by hub id or local directory."""
    import transformers

    if kind not in TOWER_KINDS:
        raise ValueError(f"unknown transformers teacher kind {kind!r}; known: {', '.join(TOWER_KINDS)}")
    tower = TOWER_KINDS[kind]
    model_class = getattr(transformers, tower.model_class)
    load_kwargs = {"dtype": dtype} if dtype is not None else {}
    model, loading = model_class.from_pretrained(str(name_or_path), output_loading_info=True, **load_kwargs)
    # Weights the model needs but the checkpoint lacks would stay random: features no one should cache.
    # (Unexpected weights are fine: a full CLIP / SigLIP checkpoint also holds the text tower.)
    absent = [*loading.get("missing_keys", []), *(str(key) for key in loading.get("mismatched_keys", []))]
    if absent:
        raise ValueError(
            f"{name_or_path}: not a {kind} checkpoint, {len(absent)} of the {tower.model_class} weights are "
            f"missing or of another shape (e.g. {', '.join(sorted(absent)[:3])}); check teacher.kind / teacher.name"
        )
    config = model.config
    teacher = TransformersTeacher(
        model,
        dict(tower.forward_kwargs),
        name=teacher_id(kind, name_or_path),
        dim=int(config.hidden_size),
        patch_size=int(config.patch_size),
        num_prefix_tokens=tower.prefix_tokens(config),
        mean=tower.mean,
        std=tower.std,
        chunk_size=chunk_size,
        autocast=autocast,
    )
    return teacher.to(device) if device is not None else teacher
