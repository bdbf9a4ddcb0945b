"""One entry point for every teacher: :func:`load_teacher` picks the loader from the checkpoint."""

from __future__ import annotations

import os
from typing import Literal

import torch

from crepa.teachers.timm_dinov2 import TIMM_PREFIXES, load_timm_teacher
from crepa.teachers.transformers_vit import MODEL_TYPES, TOWER_KINDS, load_transformers_teacher
from crepa.teachers.vit import ViTTeacher

TeacherKind = Literal["auto", "dinov2", "dinov2_with_registers", "clip", "siglip", "timm"]


def detect_teacher_kind(name_or_path: str | os.PathLike) -> str:
    """The teacher kind of a checkpoint: "timm" for a ``timm/`` or ``timm:`` name, else from the
    ``model_type`` of its transformers config (hub id or local directory)."""
    if str(name_or_path).startswith(TIMM_PREFIXES):
        return "timm"
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(str(name_or_path))
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        known = ", ".join(sorted(MODEL_TYPES))
        raise ValueError(
            f"{name_or_path}: model_type {model_type!r} is not a supported teacher (supported: {known}; "
            "or a timm model as 'timm/<name>'; or pass any callable that follows crepa.teachers.Teacher)"
        )
    return MODEL_TYPES[model_type]


def load_teacher(
    name_or_path: str | os.PathLike,
    kind: TeacherKind = "auto",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int = 16,
    autocast: bool = True,
) -> ViTTeacher:
    """Load a frozen teacher by hub id, local directory or ``timm/<name>``.

    kind "auto" reads the checkpoint's config (:func:`detect_teacher_kind`). ``chunk_size`` frames
    go through the model at once; ``autocast`` runs it in bf16 on CUDA (ignored on CPU); ``dtype``
    is the weights' dtype for transformers models.
    """
    if kind == "auto":
        kind = detect_teacher_kind(name_or_path)
    if kind == "timm":
        return load_timm_teacher(str(name_or_path), device=device, chunk_size=chunk_size, autocast=autocast)
    if kind not in TOWER_KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; choose one of auto, timm, {', '.join(TOWER_KINDS)}")
    return load_transformers_teacher(
        name_or_path, kind, device=device, dtype=dtype, chunk_size=chunk_size, autocast=autocast
    )
