"""What one training step needs: the parts it reads (:class:`StepParts`), the noised batch of the
family's objective, the cached batch's text and teacher grids, and :func:`step_loss`. The diagnostics
(:mod:`crepa.eval.diagnostics`) replay the same pieces on a trained run."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crepa.config import RunConfig, TrainSection
from crepa.models import ModelFamily
from crepa.models.conditioning import prediction_to_latents, transformer_inputs
from crepa.models.image_conditioning import image_parts
from crepa.regularizer import CrepaRegularizer
from crepa.teacher_targets import teacher_targets
from crepa.train.objectives import (
    NoisedBatch,
    ddpm,
    flow_matching,
    flow_matching_reversed,
    loss_weights,
    sample_noise_level,
    weighted_mse,
)


@dataclass
class StepParts:
    """Everything one training step reads. ``transformer`` is what the loop calls (maybe DDP-wrapped),
    ``model`` the plain module; ``teacher`` / ``vae`` are set for the online teacher modes."""

    config: RunConfig
    family: ModelFamily
    transformer: nn.Module
    model: nn.Module
    regularizer: CrepaRegularizer | None
    teacher: Any
    vae: nn.Module | None
    dtype: torch.dtype
    alphas_cumprod: torch.Tensor | None
    autocast: Callable[[], AbstractContextManager] = nullcontext
    noise_range: tuple[float, float] = (0.0, 1.0)


def noise_batch(
    config: RunConfig,
    family: ModelFamily,
    latents: torch.Tensor,
    generator: torch.Generator,
    alphas_cumprod,
    noise_range: tuple[float, float] = (0.0, 1.0),
) -> NoisedBatch:
    """The family's objective applied to clean latents (B, C, F, H, W); flow-matching noise levels are
    mapped into ``noise_range`` (one expert of a two-expert pipeline, :func:`expert_noise_range`)."""
    train = config.train
    sampling = train.timestep_sampling
    if family.objective in ("v_prediction", "epsilon"):
        levels = None  # uniform integer timesteps, the DDPM families' own draw
        if sampling not in ("auto", "uniform") or train.shift != 1.0:
            levels = _noise_levels(train, sampling, latents.shape[0], generator)
        return ddpm(latents, alphas_cumprod, generator, family.objective, levels)
    levels = _noise_levels(
        train, "logit_normal" if sampling == "auto" else sampling, latents.shape[0], generator
    )
    low, high = noise_range
    levels = low + (high - low) * levels
    objective = flow_matching if family.objective == "flow_matching" else flow_matching_reversed
    return objective(latents, levels, generator, family.timestep_scale)


def _noise_levels(train: TrainSection, sampling: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) noise levels of ``sampling`` with the run's logit-normal, mode and shift settings."""
    return sample_noise_level(
        batch, generator, sampling, train.logit_mean, train.logit_std, train.shift, train.mode_scale
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A loader batch on ``device`` (non-blocking from pinned memory: the copy overlaps the step)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def batch_text(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The text states of a cached batch for :func:`transformer_inputs` (embeddings in ``dtype``)."""
    text = {key: batch[key].to(dtype) for key in ("prompt_embeds", "pooled_prompt_embeds") if key in batch}
    if "prompt_attention_mask" in batch:
        text["prompt_attention_mask"] = batch["prompt_attention_mask"]
    return text


def batch_teacher_grid(
    config: RunConfig,
    family: ModelFamily,
    model: nn.Module,
    batch: dict[str, Any],
    teacher: Any,
    vae: nn.Module | None,
) -> torch.Tensor | None:
    """Teacher grids (B, F', H', W', D) of a cached batch from ``cache.teacher_source``; None in backbone mode."""
    if config.crepa.mode == "backbone":
        return None
    _, patch_h, patch_w = family.patch_sizes(model)
    _, _, frames, height, width = batch["latents"].shape
    return teacher_targets(
        config.cache.teacher_source,
        batch,
        (frames, height // patch_h, width // patch_w),
        family.temporal_ratio,
        teacher=teacher,
        vae=vae,
        reduce=config.teacher.reduce,
        max_pixels=config.teacher.max_pixels,
        chunk_size=config.teacher.chunk_size,
    )


def transformer_prediction(
    parts: StepParts, batch: dict[str, Any], generator: torch.Generator
) -> tuple[torch.Tensor, NoisedBatch]:
    """Noise the batch's latents and run the transformer under the step's autocast: the prediction in
    the latents' layout (B, C, F, h, w) and the noised batch (its target, timesteps, SNR)."""
    config, family = parts.config, parts.family
    latents = batch["latents"].to(parts.dtype)
    noised = noise_batch(config, family, latents, generator, parts.alphas_cumprod, parts.noise_range)
    inputs = transformer_inputs(
        parts.model,
        family,
        noised.noisy,
        noised.timesteps,
        batch_text(batch, parts.dtype),
        frame_rate=config.data.fps or 25.0,
        image=image_parts(batch),
    )
    with parts.autocast():
        prediction = parts.transformer(**inputs)[0]
    return prediction_to_latents(parts.model, family, prediction, noised.target.shape), noised


def step_loss(
    parts: StepParts, batch: dict[str, Any], step: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion + alignment loss of one batch from the cache, and its detached metrics (no host sync)."""
    config, family = parts.config, parts.family
    teacher_grid = None
    if config.crepa.enabled:  # before the forward: no activations wait on the teacher
        teacher_grid = batch_teacher_grid(config, family, parts.model, batch, parts.teacher, parts.vae)
    prediction, noised = transformer_prediction(parts, batch, generator)
    alignment = None
    if parts.regularizer is not None:
        with parts.autocast():  # the projector runs under the transformer's autocast (fp32 weights)
            alignment = parts.regularizer.loss(teacher_grid, step=step)
    if config.train.loss_weighting == "none":
        diffusion_loss = F.mse_loss(prediction.float(), noised.target.float())
    else:
        weights = loss_weights(
            config.train.loss_weighting, family.objective, noised.snr, config.train.snr_gamma
        )
        diffusion_loss = weighted_mse(prediction, noised.target, weights)
    loss = diffusion_loss
    metrics = {"loss/diffusion": diffusion_loss.detach()}
    if alignment is not None:
        loss = loss + alignment.loss
        metrics |= alignment.metrics
    metrics["loss/total"] = loss.detach()
    return loss, metrics
