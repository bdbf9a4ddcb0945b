"""Teachers from timm (optional extra): DINOv2 ViTs such as ``vit_large_patch14_dinov2.lvd142m``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from crepa.teachers.vit import IMAGENET_MEAN, IMAGENET_STD, ViTTeacher

TIMM_PREFIXES = ("timm/", "timm:")


class TimmTeacher(ViTTeacher):
    """A timm ViT built with ``dynamic_img_size=True``; ``forward_features`` gives [prefix, patches]."""

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            "timm teachers need the optional timm package: pip install 'crepa[timm]' "
            "(or use a transformers DINOv2 such as facebook/dinov2-large, which needs nothing extra)"
        ) from error
    return timm


def load_timm_teacher(
    name: str,
    *,
    weights_file: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    chunk_size: int = 16,
    autocast: bool = True,
) -> TimmTeacher:
    """Load a timm ViT as a teacher.

    ``name``: "timm/<model>" (a Hugging Face hub repository of timm weights, e.g.
    "timm/vit_base_patch14_reg4_dinov2.lvd142m") or "timm:<model>" (timm's own pretrained tag).
    ``weights_file``: load the weights from this local file instead of downloading them.
    """
    timm = _import_timm()
    if not name.startswith(TIMM_PREFIXES):
        raise ValueError(f"timm teacher names start with 'timm/' or 'timm:', got {name!r}")
    model_name = name[len("timm/") :]
    if name.startswith("timm/") and weights_file is None:
        model_name = f"hf-hub:{name}"  # timm reads a local weights file only for its own model names
    overlay = {"file": str(weights_file)} if weights_file is not None else None
    model = timm.create_model(
        model_name, pretrained=True, num_classes=0, dynamic_img_size=True, pretrained_cfg_overlay=overlay
    )
    patch_size = model.patch_embed.patch_size
    if patch_size[0] != patch_size[1]:
        raise ValueError(f"{name}: non-square patches {patch_size} are not supported")
    config = getattr(model, "pretrained_cfg", {}) or {}
    teacher = TimmTeacher(
        model,
        name=name if weights_file is None else f"{name}@{Path(weights_file).resolve().as_posix()}",
        dim=int(model.num_features),
        patch_size=int(patch_size[0]),
        num_prefix_tokens=int(model.num_prefix_tokens),
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        chunk_size=chunk_size,
        autocast=autocast,
    )
    return teacher.to(device) if device is not None else teacher
