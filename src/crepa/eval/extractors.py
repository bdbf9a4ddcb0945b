"""Feature extractors for the evaluation: frames in, one feature vector per frame (or per clip) out.

Built in, through transformers, from a local directory or a hub id (``from_pretrained``):

- ``dino``: DINO ViT-B/16 (``facebook/dino-vitb16``), CLS token after the final norm; frames
  resized to a 224-pixel short side, not cropped (VBench's subject consistency).
- ``clip``: CLIP ViT-B/32 (``openai/clip-vit-base-patch32``), projected image embedding; short
  side 224 (bicubic), centre crop 224, CLIP's normalisation (VBench's background consistency).
- ``dinov2``: DINOv2 (``facebook/dinov2-base``; registers variants load too), CLS token after the
  final norm; short side 256 (bicubic), centre crop 224.
- ``videomae``: a VideoMAE video model (no default: give its weights), mean of its last hidden
  states over ``num_frames`` uniformly sampled frames: one feature per clip.
- ``teacher``: any teacher of :mod:`crepa.teachers` (``teacher:NAME_OR_DIR``, loaded with
  :func:`crepa.teachers.load_teacher`): its patch tokens averaged over the grid, on a 224-pixel
  centre crop (rounded to the patch size).
- ``py:package.module:factory``: ``factory()`` returns an extractor, a :class:`crepa.teachers.Teacher`
  or any callable of frames (wrapped by :class:`CallableExtractor`).

Every extractor takes uint8 RGB frames (T, H, W, 3) and returns float32 features on the CPU:
(T, D) for ``level == "frame"``, (D,) for ``level == "clip"``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crepa.models.hub import check_loadable, hub_access
from crepa.teachers import Teacher, load_teacher
from crepa.teachers.vit import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

Level = Literal["frame", "clip"]


DEFAULT_SOURCES: dict[str, str | None] = {
    "dino": "facebook/dino-vitb16",
    "clip": "openai/clip-vit-base-patch32",
    "dinov2": "facebook/dinov2-base",
    "videomae": None,
    "teacher": None,
}


@runtime_checkable
class FeatureExtractor(Protocol):
    """uint8 RGB frames (T, H, W, 3) -> float32 features (T, D) (level "frame") or (D,) (level "clip")."""

    name: str
    level: Level

    def __call__(self, frames: np.ndarray) -> torch.Tensor: ...


def resize_short_side(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(B, C, H, W) -> short side ``size``, long side int(size * long / short), without antialiasing."""
    height, width = images.shape[-2:]
    target = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    if target == (height, width):
        return images
    return F.interpolate(images, size=target, mode=mode, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) from the centre (the image must be at least that large)."""
    height, width = images.shape[-2:]
    top, left = round((height - size) / 2), round((width - size) / 2)
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pixel values 0..255 (B, 3, H, W) -> (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images / 255.0 - mean_t) / std_t


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, H, W) view (callers convert chunk by chunk to bound memory)."""
    tensor = torch.as_tensor(np.asarray(frames))
    if tensor.ndim != 4 or tensor.shape[-1] != 3 or tensor.dtype != torch.uint8:
        raise ValueError(f"expected uint8 RGB frames (T, H, W, 3), got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2)


@dataclass
class ModelExtractor:
    """A transformers vision model behind a fixed preprocessing and a readout of one vector per input.

    preprocess: float32 (B, 3, H, W) with values 0..255 -> model input; readout: (model, input) -> (B, D).
    For level "clip", the ``clip_frames`` uniformly sampled frames form one (1, T, 3, S, S) input.
    """

    name: str
    model: nn.Module
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    readout: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    level: Level = "frame"
    clip_frames: int = 0
    batch_size: int = 32
    device: str = "cpu"

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        images = frames_to_tensor(frames)
        if self.level == "clip":
            indices = np.linspace(0, len(images) - 1, self.clip_frames).round().astype(int)
            clip = self.preprocess(images[indices].to(self.device).float()).unsqueeze(0)
            return self.readout(self.model, clip)[0].float().cpu()
        chunks = [
            self.readout(self.model, self.preprocess(chunk.to(self.device).float())).float().cpu()
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(chunks)


@dataclass
class CallableExtractor:
    """Any callable as an extractor: it receives uint8 frames as a tensor (T, H, W, 3).

    It may return (T, D) (frame level), a patch grid (T, h, w, D) (mean-pooled over the grid, e.g.
    a teacher's patch tokens), or (D,) for level "clip".
    """

    function: Callable[[torch.Tensor], torch.Tensor]
    name: str
    level: Level = "frame"

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        images = torch.as_tensor(np.asarray(frames))
        features = torch.as_tensor(self.function(images)).float().cpu()
        if self.level == "clip":
            if features.ndim != 1:
                raise ValueError(
                    f"extractor {self.name}: a clip-level extractor must return (D,), got {tuple(features.shape)}"
                )
            return features
        if features.ndim == 4:
            features = features.mean(dim=(1, 2))
        if features.ndim != 2 or features.shape[0] != len(images):
            raise ValueError(
                f"extractor {self.name}: expected (T, D) or (T, h, w, D) features for {len(images)} "
                f"frames, got {tuple(features.shape)}"
            )
        return features


@dataclass
class TeacherExtractor:
    """A :class:`crepa.teachers.Teacher` as a frame-level extractor: mean of its patch grid per frame.

    Frames are resized to a 224-pixel short side and centre-cropped to a square whose side is the
    multiple of the teacher's patch size nearest 224.
    """

    teacher: Teacher
    batch_size: int = 32
    level: Level = "frame"

    @property
    def name(self) -> str:
        return f"teacher ({self.teacher.name})"

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        side = self.teacher.patch_size * max(1, round(224 / self.teacher.patch_size))
        device = getattr(self.teacher, "device", "cpu")
        chunks = []
        for chunk in frames_to_tensor(frames).split(self.batch_size):
            pixels = center_crop(resize_short_side(chunk.to(device).float(), side, "bilinear"), side) / 255.0
            chunks.append(self.teacher(pixels).mean(dim=(1, 2)).float().cpu())
        return torch.cat(chunks)


def _dino(source: str, device: str, batch_size: int) -> ModelExtractor:
    from transformers import ViTModel

    model = ViTModel.from_pretrained(source, add_pooling_layer=False).to(device).eval()

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        return normalize(resize_short_side(images, 224, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)

    def readout(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, 0]

    return ModelExtractor(
        f"dino ({source})", model, preprocess, readout, batch_size=batch_size, device=device
    )


def _clip(source: str, device: str, batch_size: int) -> ModelExtractor:
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    # A full CLIP checkpoint loads whole (no warnings about the text tower) and keeps its vision half.
    loader = (
        CLIPModel
        if AutoConfig.from_pretrained(source).model_type == "clip"
        else CLIPVisionModelWithProjection
    )
    loaded = loader.from_pretrained(source)
    model = (
        nn.ModuleDict({"vision": loaded.vision_model, "projection": loaded.visual_projection})
        .to(device)
        .eval()
    )

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        resized = center_crop(resize_short_side(images, 224, "bicubic"), 224)
        return normalize(resized, CLIP_MEAN, CLIP_STD)

    def readout(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        pooled = model["vision"](pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
        return model["projection"](pooled)

    return ModelExtractor(
        f"clip ({source})", model, preprocess, readout, batch_size=batch_size, device=device
    )


def _dinov2(source: str, device: str, batch_size: int) -> ModelExtractor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source).to(device).eval()

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        resized = center_crop(resize_short_side(images, 256, "bicubic"), 224)
        return normalize(resized, IMAGENET_MEAN, IMAGENET_STD)

    def readout(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels).last_hidden_state[:, 0]

    return ModelExtractor(
        f"dinov2 ({source})", model, preprocess, readout, batch_size=batch_size, device=device
    )


def _videomae(source: str, device: str, batch_size: int) -> ModelExtractor:
    from transformers import VideoMAEModel

    model = VideoMAEModel.from_pretrained(source).to(device).eval()
    size = int(model.config.image_size)

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        return normalize(
            center_crop(resize_short_side(images, size, "bilinear"), size), IMAGENET_MEAN, IMAGENET_STD
        )

    def readout(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels).last_hidden_state.mean(dim=1)

    return ModelExtractor(
        f"videomae ({source})",
        model,
        preprocess,
        readout,
        level="clip",
        clip_frames=int(model.config.num_frames),
        batch_size=batch_size,
        device=device,
    )


def _teacher(source: str, device: str, batch_size: int) -> TeacherExtractor:
    return TeacherExtractor(load_teacher(source, device=device), batch_size=batch_size)


_BUILDERS: dict[str, Callable[[str, str, int], FeatureExtractor]] = {
    "dino": _dino,
    "clip": _clip,
    "dinov2": _dinov2,
    "videomae": _videomae,
    "teacher": _teacher,
}


def extractor_source(spec: str) -> tuple[str, str]:
    """(kind, source) of a built-in extractor ``spec`` ("KIND" or "KIND:SOURCE"): its weights as a
    local dir or hub id, the default when none is given; a ValueError for an unknown kind or a missing dir."""
    kind, _, source = spec.partition(":")
    if kind not in _BUILDERS:
        raise ValueError(
            f"unknown extractor {spec!r}: use one of {', '.join(_BUILDERS)} (optionally KIND:DIR_OR_HUB_ID) "
            "or py:module:factory"
        )
    source = source or DEFAULT_SOURCES[kind]
    if not source:
        raise ValueError(f"extractor {kind!r} has no default weights: give them as {kind}:DIR_OR_HUB_ID")
    source = os.path.expanduser(source)
    if source.startswith((".", os.path.sep)) and not os.path.isdir(source):
        raise ValueError(
            f"extractor {spec!r}: {source} is not a directory (give a model directory or a hub id)"
        )
    return kind, source


def load_extractor(spec: str, device: str = "cpu", batch_size: int = 32) -> FeatureExtractor:
    """Build the extractor named by ``spec``: "KIND", "KIND:SOURCE" (local dir or hub id) or "py:module:factory"."""
    kind, _, target = spec.partition(":")
    if kind == "py":
        return _from_python(target)
    kind, source = extractor_source(spec)
    with hub_access(source, f"--extractor {kind}:FOLDER"):
        return _BUILDERS[kind](source, device, batch_size)


def check_extractor(spec: str) -> None:
    """Raise now (:class:`~crepa.models.hub.HubUnreachableError`, ValueError) when ``spec`` will not load
    later, without loading it: for work that evaluates only at its end. A ``py:`` factory and timm's
    own ``timm:`` names are not checked (their loading is their own)."""
    if spec.partition(":")[0] == "py":
        return
    kind, source = extractor_source(spec)
    if not source.startswith("timm:"):
        check_loadable(source, f"--extractor {kind}:FOLDER", "config.json")


def _from_python(target: str) -> FeatureExtractor:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"py extractor must be py:package.module:factory, got py:{target}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the extractor factory py:{target}: {error}") from error
    extractor = factory()
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if isinstance(extractor, Teacher):
        return TeacherExtractor(extractor)
    if callable(extractor):
        return CallableExtractor(extractor, name=f"py:{target}")
    raise ValueError(f"py:{target}() returned {type(extractor).__name__}, not a callable")
