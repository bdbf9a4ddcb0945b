"""The evaluation's extractors, trained on the world's ground truth (never the training teacher):

- a frame classifier (transformers ``ResNetForImageClassification``, multi-label): which shapes,
  colours and patterns a frame shows, and how many objects are visible (one-hot, 0..MAX_OBJECTS);
- a motion classifier (the same class on a clip's frames stacked as channels, every
  ``MOTION_STRIDE``-th frame): which of :data:`~crepa.demo.world.MOTION_LABELS` the clip shows.

The frame classifier's pooled features stand in for VBench's DINO in subject consistency and for
the Frechet distance's video features; its decisions and the motion classifier's give the
world-aware metrics (:mod:`crepa.demo.evaluate`). Both train on the ``probe`` split (generic and
user clips, never the held-out ones), so they know a bounce and a dotted star when they see one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from crepa.demo.artefacts import build_once
from crepa.demo.fitting import fit
from crepa.demo.teacher import normalise_frames
from crepa.demo.world import LABELS, MAX_OBJECTS, RenderedSplit
from crepa.eval import CallableExtractor

FRAME_DIR, MOTION_DIR = "frames", "motion"
COUNT_CLASSES = MAX_OBJECTS + 1  # 0, 1 or 2 visible objects
MOTION_STRIDE = 2  # the motion classifier sees frames 0, 2, 4, ...


@dataclass(frozen=True)
class ExtractorSettings:
    """Architecture and training of the two classifiers."""

    widths: tuple[int, ...] = (32, 64)
    steps: int = 500
    motion_steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def frame_targets(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Attribute multi-hot (N, len(LABELS)) and counts (N,) -> targets (N, len(LABELS) + COUNT_CLASSES)."""
    return np.concatenate(
        [labels, np.eye(COUNT_CLASSES, dtype=np.float32)[np.minimum(counts, MAX_OBJECTS)]], 1
    )


def motion_input(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> normalised frames stacked as channels (B, 3 * ceil(T / stride), H, W)."""
    picked = clips[:, ::MOTION_STRIDE]
    return normalise_frames(picked.flatten(0, 1)).unflatten(0, picked.shape[:2]).flatten(1, 2)


def _classifier(settings: ExtractorSettings, labels: int, channels: int) -> ResNetForImageClassification:
    config = ResNetConfig(
        num_channels=channels,
        embedding_size=16 if channels == 3 else 32,
        hidden_sizes=list(settings.widths),
        depths=[1] * len(settings.widths),
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=labels,
        problem_type="multi_label_classification",
    )
    return ResNetForImageClassification(config)


def train_classifier(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    prepare,
    channels: int,
    steps: int,
    settings: ExtractorSettings,
    description: str,
    progress: bool = True,
) -> ResNetForImageClassification:
    """Multi-label classification of ``prepare(inputs[batch])`` against ``targets`` (N, L) in {0, 1}."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model = _classifier(settings, targets.shape[1], channels)

    def batch_loss() -> torch.Tensor:
        pick = torch.randint(len(inputs), (settings.batch_size,), generator=generator)
        return model(pixel_values=prepare(inputs[pick]), labels=targets[pick]).loss

    model.train()
    fit(model.parameters(), batch_loss, steps, settings.lr, description, progress)
    return model.eval()


def build_extractor(
    directory: Path, split: RenderedSplit, settings: ExtractorSettings, upstream: dict, progress: bool = True
) -> bool:
    """Train both classifiers on ``split`` and save them in ``directory/frames`` and
    ``directory/motion`` unless they are there already; returns whether they were reused."""

    def build(staging: Path) -> None:
        targets = torch.from_numpy(frame_targets(split.labels, split.counts))
        frames = train_classifier(
            torch.from_numpy(split.frames),
            targets,
            normalise_frames,
            3,
            settings.steps,
            settings,
            "extractor (frames)",
            progress,
        )
        frames.save_pretrained(staging / FRAME_DIR)
        clips = torch.from_numpy(split.clips)
        channels = 3 * len(range(0, clips.shape[1], MOTION_STRIDE))
        motion = train_classifier(
            clips,
            torch.from_numpy(split.motions),
            motion_input,
            channels,
            settings.motion_steps,
            settings,
            "extractor (motion)",
            progress,
        )
        motion.save_pretrained(staging / MOTION_DIR)

    return build_once(directory, {"extractor": asdict(settings), **upstream}, build)


@dataclass
class WorldReader:
    """The trained classifiers' decisions on clips."""

    frames: ResNetForImageClassification
    motion: ResNetForImageClassification

    @classmethod
    def load(cls, directory: Path) -> WorldReader:
        load = ResNetForImageClassification.from_pretrained
        return cls(load(directory / FRAME_DIR).eval(), load(directory / MOTION_DIR).eval())

    @torch.no_grad()
    def read(self, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 clips (N, T, H, W, 3) -> attributes bool (N, T, len(LABELS)), visible-object counts
        int (N, T) and motions bool (N, len(MOTION_LABELS)), each at logit > 0 (count: arg max)."""
        images = torch.from_numpy(clips)
        logits = torch.cat(
            [
                self.frames(pixel_values=normalise_frames(chunk)).logits
                for chunk in images.flatten(0, 1).split(512)
            ]
        ).unflatten(0, images.shape[:2])
        attributes, counts = logits[..., : len(LABELS)] > 0, logits[..., len(LABELS) :].argmax(-1)
        motions = self.motion(pixel_values=motion_input(images)).logits > 0
        return attributes.numpy(), counts.numpy(), motions.numpy()

    def features(self) -> CallableExtractor:
        """The frame classifier's pooled features: uint8 (T, H, W, 3) -> (T, D), for crepa eval's metrics."""

        def features(frames: torch.Tensor) -> torch.Tensor:
            return self.frames.resnet(pixel_values=normalise_frames(frames)).pooler_output.flatten(1)

        return CallableExtractor(features, name="attribute classifier")


def load_attribute_extractor(directory: Path) -> CallableExtractor:
    """The saved frame classifier as crepa eval's frame-level extractor."""
    return WorldReader.load(directory).features()
