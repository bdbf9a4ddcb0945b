"""Evaluation of the demo's runs through ``crepa.eval``: sample clips for the held-out prompts with
the diffusers pipeline (LoRA loaded with ``load_lora_weights``), measure them like ``crepa eval``
does, and compute CKNNA between the aligned block and the teacher on the held-out clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from crepa.cache import CachedDataset
from crepa.demo.extractor import load_attribute_extractor
from crepa.demo.latent import PCAVideoAutoencoder
from crepa.demo.world import LOSSLESS_CRF
from crepa.eval import FeatureExtractor, block_cknna, evaluate_clips, find_clips, resolve_metrics
from crepa.eval.report import write_eval_report
from crepa.io.video import write_video
from crepa.models import get_family
from crepa.models.conditioning import transformer_inputs
from crepa.models.pipelines import decode_latents
from crepa.train.objectives import ddpm

FAMILY = get_family("cogvideox")
FEATURE_METRICS = ("subject_consistency", "frechet_distance")
CKNNA_DRAWS = 2  # noised copies of each held-out clip (timesteps and noise as in training)


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling of the evaluation clips (no classifier-free guidance: training never drops captions)."""

    inference_steps: int = 25
    fps: float = 8.0


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
def sample_clips(
    pipeline: diffusers.CogVideoXPipeline,
    prompts: list[str],
    size: int,
    num_frames: int,
    settings: SamplingSettings,
    seed: int,
) -> np.ndarray:
    """One clip per prompt, uint8 (N, T, H, W, 3); prompt i starts from the noise of (seed, i)."""
    generators = [torch.Generator().manual_seed(seed * 100_003 + index) for index in range(len(prompts))]
    frames = pipeline(
        prompt=prompts,
        height=size,
        width=size,
        num_frames=num_frames,
        num_inference_steps=settings.inference_steps,
        guidance_scale=1.0,
        generator=generators,
        output_type="np",
        max_sequence_length=pipeline.transformer.config.max_text_seq_length,
    ).frames
    return (np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruct_clips(pipeline: diffusers.CogVideoXPipeline, cache_dir: Path) -> np.ndarray:
    """The held-out clips through the VAE (encode in precompute, decode here): uint8 (N, T, H, W, 3)."""
    dataset = CachedDataset(cache_dir, teacher=False)
    latents = torch.stack([dataset[i]["latents"] for i in range(len(dataset))]).float()
    frames = decode_latents(pipeline.vae, latents)  # (N, 3, T, H, W) in [-1, 1]
    return ((frames.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


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
def heldout_cknna(
    pipeline: diffusers.CogVideoXPipeline, cache_dir: Path, block_index: int, seed: int = 0, k: int = 10
) -> float:
    """CKNNA between block ``block_index``'s hidden states (no projector, so every variant is measured
    alike) and the teacher grids of the held-out clips, one sample per (clip, latent frame, draw)."""
    transformer = pipeline.transformer
    dataset = CachedDataset(cache_dir, teacher=True)
    items = [dataset[i] for i in range(len(dataset))]
    latents = torch.stack([item["latents"] for item in items]).float()
    teacher = torch.stack([item["teacher"] for item in items]).float()
    text = {"prompt_embeds": torch.stack([item["prompt_embeds"] for item in items]).float()}
    alphas = pipeline.scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(CKNNA_DRAWS):
        noised = ddpm(latents, alphas, generator, "v_prediction")
        call = transformer_inputs(transformer, FAMILY, noised.noisy, noised.timesteps, text)
        samples.append((call, teacher))
    return block_cknna(transformer, block_index, samples, k=k)


@dataclass(frozen=True)
class EvalJob:
    """Sample and evaluate one model: the base pipeline, with the LoRA in ``lora_dir`` when given."""

    name: str
    pipeline_dir: Path
    lora_dir: Path | None
    seed: int
    prompts: tuple[str, ...]
    size: int
    num_frames: int
    sampling: SamplingSettings
    block_index: int
    extractor_dir: Path
    heldout_dir: Path
    heldout_cache: Path
    samples_dir: Path
    eval_dir: Path


def run_eval_job(job: EvalJob) -> tuple[str, dict[str, dict[str, Any]]]:
    """Sample ``job.prompts``, write the clips, evaluate them against the held-out clips, add CKNNA;
    returns (job name, metric summary). A top-level function, so worker processes can run it."""
    pipeline = load_pipeline(job.pipeline_dir, job.lora_dir)
    clips = sample_clips(pipeline, list(job.prompts), job.size, job.num_frames, job.sampling, job.seed)
    videos = write_clips(job.samples_dir, clips, list(job.prompts), job.sampling.fps)
    extractor = load_attribute_extractor(job.extractor_dir)
    metrics = evaluate_folder(videos, job.eval_dir, extractor, job.heldout_dir)
    metrics["cknna"] = {"value": heldout_cknna(pipeline, job.heldout_cache, job.block_index)}
    return job.name, metrics
