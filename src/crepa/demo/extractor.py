"""The evaluation's feature extractor: a tiny ResNet (transformers ``ResNetForImageClassification``)
trained on the world's ground truth to tell which shapes, colours and patterns a frame shows.

Its pooled features stand in for VBench's DINO in subject consistency and for the Frechet
distance's video features. It is deliberately not the training teacher (another architecture,
supervised on attributes), so alignment with the teacher cannot improve a score by itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import ResNetConfig, ResNetForImageClassification

from crepa.demo.artefacts import build_once
from crepa.demo.teacher import normalise_frames
from crepa.demo.world import RenderedSplit
from crepa.eval import CallableExtractor


@dataclass(frozen=True)
class ExtractorSettings:
    """Architecture and training of the attribute classifier."""

    widths: tuple[int, ...] = (32, 64)
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def train_attribute_classifier(
    frames: np.ndarray, labels: np.ndarray, settings: ExtractorSettings, progress: bool = True
) -> ResNetForImageClassification:
    """Multi-label classification of uint8 frames (N, H, W, 3) against labels (N, L) in {0, 1}."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    config = ResNetConfig(
        embedding_size=16,
        hidden_sizes=list(settings.widths),
        depths=[1] * len(settings.widths),
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=labels.shape[1],
        problem_type="multi_label_classification",
    )
    model = ResNetForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps)
    images, targets = torch.from_numpy(frames), torch.from_numpy(labels)
    model.train()
    bar = tqdm(range(settings.steps), desc="extractor (attributes)", unit="step", disable=not progress)
    for _ in bar:
        pick = torch.randint(len(images), (settings.batch_size,), generator=generator)
        loss = model(pixel_values=normalise_frames(images[pick]), labels=targets[pick]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def attribute_accuracy(model: ResNetForImageClassification, frames: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (frame, attribute) decisions right at threshold 0.5 (uint8 frames (N, H, W, 3))."""
    logits = torch.cat(
        [model(pixel_values=normalise_frames(chunk)).logits for chunk in torch.from_numpy(frames).split(256)]
    )
    return float(((logits > 0) == torch.from_numpy(labels).bool()).float().mean())


def build_extractor(
    directory: Path, split: RenderedSplit, settings: ExtractorSettings, upstream: dict, progress: bool = True
) -> bool:
    """Train on ``split``'s frames and labels and save the classifier in ``directory`` unless it is
    there already; returns whether it was reused."""

    def build(staging: Path) -> None:
        train_attribute_classifier(split.frames, split.labels, settings, progress).save_pretrained(staging)

    return build_once(directory, {"extractor": asdict(settings), **upstream}, build)


def load_attribute_extractor(directory: Path) -> CallableExtractor:
    """The saved classifier as a frame-level extractor: uint8 (T, H, W, 3) -> pooled features (T, D)."""
    model = ResNetForImageClassification.from_pretrained(directory).eval()

    def features(frames: torch.Tensor) -> torch.Tensor:
        return model.resnet(pixel_values=normalise_frames(frames)).pooler_output.flatten(1)

    return CallableExtractor(features, name=f"attribute classifier ({directory.name})")
