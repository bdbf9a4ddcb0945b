"""Evaluation of the demo's models (called by its ``crepa experiment`` evaluator,
:class:`crepa.demo.experiment.DemoEvaluator`, and for the held-out clips): crepa eval's metrics with the
attribute classifier as extractor, what only a synthetic world can measure (:func:`world_metrics`, from
the evaluation's classifiers, never the training teacher), the VAE round trip (:func:`psnr`), and, on
the held-out clips, CKNNA between the aligned block and the teacher and every block's adjacent-frame
similarity (RepVideo's diagnostic).

World-aware metrics, per clip (means over clips are the table's values):

- ``colour_accuracy`` / ``shape_accuracy`` / ``texture_accuracy``: fraction of frames whose predicted
  set of colours (shapes, patterns) is exactly the caption's;
- ``identity_persistence``: fraction of frames 1.. whose predicted attributes all equal frame 0's;
- ``count_stability``: fraction of frames showing as many objects as the caption names;
- ``motion_correctness``: 1 when the predicted set of motions (bounces / moves + direction, rotates)
  is exactly the caption's, else 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import diffusers
import numpy as np
import torch

from crepa.cache import CachedDataset
from crepa.demo.extractor import WorldReader
from crepa.demo.latent import PCAVideoAutoencoder
from crepa.demo.world import (
    ATTRIBUTE_GROUPS,
    LABELS,
    LOSSLESS_CRF,
    ClipSpec,
    caption_labels,
    motion_labels,
)
from crepa.eval import FeatureExtractor, block_cknna, evaluate_clips, find_clips, resolve_metrics
from crepa.eval.layers import layer_similarity_profile
from crepa.eval.report import write_eval_report
from crepa.io.video import write_video
from crepa.models import get_family
from crepa.models.conditioning import transformer_inputs
from crepa.models.pipelines import decode_latents
from crepa.train.objectives import ddpm

FAMILY = get_family("cogvideox")
FEATURE_METRICS = ("subject_consistency", "frechet_distance")
WORLD_METRICS = (
    "colour_accuracy",
    "shape_accuracy",
    "texture_accuracy",
    "identity_persistence",
    "count_stability",
    "motion_correctness",
)
CKNNA_DRAWS = 2  # noised copies of each held-out clip (timesteps and noise as in training)


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling of the evaluation clips (no classifier-free guidance: training never drops captions)."""

    inference_steps: int = 20
    fps: float = 8.0
    samples_per_prompt: int = 2


def load_pipeline(pipeline_dir: Path, lora_dir: Path | None = None) -> diffusers.CogVideoXPipeline:
    """The base pipeline, with the LoRA of a finished run loaded the way users load it."""
    vae = PCAVideoAutoencoder.from_pretrained(pipeline_dir / "vae")  # not a diffusers class: pass it
    pipeline = diffusers.CogVideoXPipeline.from_pretrained(pipeline_dir, vae=vae)
    if lora_dir is not None:
        pipeline.load_lora_weights(lora_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_clips(directory: Path, clips: np.ndarray, captions: list[str], fps: float) -> Path:
    """uint8 clips (N, T, H, W, 3) as lossless ``clip-XXXX.mp4`` + caption files in ``directory``
    (lossless, so the metrics see exactly the sampled frames, the same in every run)."""
    for index, (clip, caption) in enumerate(zip(clips, captions, strict=True)):
        write_video(directory / f"clip-{index:04d}.mp4", clip, fps=fps, crf=LOSSLESS_CRF)
        (directory / f"clip-{index:04d}.txt").write_text(caption + "\n", encoding="utf-8")
    return directory


@torch.no_grad()
def reconstruct_clips(pipeline: diffusers.CogVideoXPipeline, cache_dir: Path) -> np.ndarray:
    """The held-out clips through the VAE (encode in precompute, decode here): uint8 (N, T, H, W, 3)."""
    dataset = CachedDataset(cache_dir, teacher=False)
    latents = torch.stack([dataset[i]["latents"] for i in range(len(dataset))]).float()
    frames = decode_latents(pipeline.vae, latents)  # (N, 3, T, H, W) in [-1, 1]
    return ((frames.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def world_metrics(
    attributes: np.ndarray, counts: np.ndarray, motions: np.ndarray, specs: list[ClipSpec]
) -> dict[str, np.ndarray]:
    """Per-clip world-aware metrics (see the module docstring) from the extractors' decisions:
    attributes bool (N, T, len(LABELS)), counts (N, T), motions bool (N, len(MOTION_LABELS)) for the
    clips sampled from (or showing) ``specs``. Returns metric -> float64 (N,)."""
    truth = np.stack([caption_labels(spec) for spec in specs]).astype(bool)[:, None]  # (N, 1, L)
    result = {}
    for group, names in ATTRIBUTE_GROUPS.items():
        columns = [LABELS.index(name) for name in names]
        same = (attributes[..., columns] == truth[..., columns]).all(-1)  # (N, T)
        result[f"{group}_accuracy"] = same.mean(1)
    result["identity_persistence"] = (attributes[:, 1:] == attributes[:, :1]).all(-1).mean(1)
    objects = np.array([len(spec.objects) for spec in specs])[:, None]
    result["count_stability"] = (counts == objects).mean(1)
    expected = np.stack([motion_labels(spec) for spec in specs]).astype(bool)
    result["motion_correctness"] = (motions == expected).all(-1).astype(float)
    return {name: values.astype(np.float64) for name, values in result.items()}


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays of one shape (..., H, W, 3), over every value (OpenCV's cv2.PSNR)."""
    shape = (-1, reference.shape[-2], 3)
    return float(
        cv2.PSNR(
            np.ascontiguousarray(reference.reshape(shape)),
            np.ascontiguousarray(reconstruction.reshape(shape)),
        )
    )


def world_entries(reader: WorldReader, clips: np.ndarray, specs: list[ClipSpec]) -> dict[str, dict[str, Any]]:
    """The world-aware metrics of uint8 clips (N, T, H, W, 3) as metric entries: mean and per-clip values."""
    per_clip = world_metrics(*reader.read(clips), specs)
    return {
        name: {"value": float(values.mean()), "per_clip": values.tolist()}
        for name, values in per_clip.items()
    }


def evaluate_folder(
    videos_dir: Path,
    out_dir: Path,
    extractor: FeatureExtractor,
    reference_dir: Path | None,
) -> dict[str, dict[str, Any]]:
    """``crepa eval VIDEOS_DIR --reference REFERENCE_DIR`` with ``extractor`` for the feature metrics:
    writes metrics.json, per_video.csv and a plot into ``out_dir``; returns the metric summary."""
    requested = ["subject_consistency", "temporal_flickering", "warping_error"]
    if reference_dir is not None:
        requested.append("frechet_distance")
    metrics = resolve_metrics(requested, with_reference=reference_dir is not None)
    extractors = {metric: extractor for metric in FEATURE_METRICS if metric in metrics}
    reference = find_clips(reference_dir) if reference_dir is not None else []
    result = evaluate_clips(find_clips(videos_dir), metrics, extractors, reference=reference, progress=False)
    return write_eval_report(out_dir, result, videos_dir=videos_dir, reference_dir=reference_dir)["metrics"]


@torch.no_grad()
def heldout_representations(
    pipeline: diffusers.CogVideoXPipeline, cache_dir: Path, block_index: int, seed: int = 0, k: int = 10
) -> tuple[float, list[float]]:
    """On the held-out clips, noised as in training (``CKNNA_DRAWS`` draws per clip): CKNNA between block
    ``block_index``'s hidden states (no projector, so every variant is measured alike) and the teacher
    grids, one sample per (clip, latent frame, draw); and every block's adjacent-frame similarity."""
    transformer = pipeline.transformer
    dataset = CachedDataset(cache_dir, teacher=True)
    items = [dataset[i] for i in range(len(dataset))]
    weight = next(transformer.parameters())  # the model's device and dtype (CUDA + bf16 on a GPU)
    latents = torch.stack([item["latents"] for item in items]).to(weight)
    teacher = torch.stack([item["teacher"] for item in items]).float()
    text = {"prompt_embeds": torch.stack([item["prompt_embeds"] for item in items]).to(weight)}
    alphas = pipeline.scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(CKNNA_DRAWS):
        noised = ddpm(latents, alphas, generator, "v_prediction")
        call = transformer_inputs(transformer, FAMILY, noised.noisy, noised.timesteps, text)
        samples.append((call, teacher))
    profile = layer_similarity_profile(transformer, [call for call, _ in samples])
    return block_cknna(transformer, block_index, samples, k=k), profile.tolist()
