"""Diffusion training objectives: noise a clean latent batch and say what the model must predict.

One function per objective family of the registry (``ModelFamily.objective``):
flow matching (Wan, HunyuanVideo, LTX-Video, Cosmos Predict 2), its reversed form (Mochi) and DDPM
v / epsilon prediction (CogVideoX, Allegro). Randomness comes from an explicit generator so a
resumed run draws exactly the same noise and timesteps; everything is drawn on the generator's
device (a CUDA generator keeps the step free of host-to-device copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TimestepSampling = Literal["uniform", "logit_normal"]


@dataclass(frozen=True)
class NoisedBatch:
    """noisy: model input (B, C, F, H, W); timesteps: (B,) as the transformer expects them;
    target: what the prediction is regressed onto (same shape as noisy)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def sample_noise_level(
    batch: int,
    generator: torch.Generator,
    sampling: TimestepSampling = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Noise levels s in (0, 1), shape (B,): uniform or sigmoid(N(mean, std)), then the shift
    s' = shift * s / (1 + (shift - 1) * s) that moves mass to high noise for large videos."""
    if sampling == "uniform":
        levels = torch.rand(batch, generator=generator, device=generator.device)
    elif sampling == "logit_normal":
        levels = torch.sigmoid(
            logit_mean + logit_std * torch.randn(batch, generator=generator, device=generator.device)
        )
    else:
        raise ValueError(f"timestep sampling must be 'uniform' or 'logit_normal', got {sampling!r}")
    return shift * levels / (1 + (shift - 1) * levels)


def flow_matching(
    latents: torch.Tensor, levels: torch.Tensor, generator: torch.Generator, timestep_scale: float = 1000.0
) -> NoisedBatch:
    """x_s = (1 - s) x0 + s noise, target noise - x0, timestep = scale * s."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
    s = levels.to(latents).view(-1, *([1] * (latents.ndim - 1)))
    return NoisedBatch(
        (1 - s) * latents + s * noise, levels.to(latents.device) * timestep_scale, noise - latents
    )


def flow_matching_reversed(
    latents: torch.Tensor, levels: torch.Tensor, generator: torch.Generator, timestep_scale: float = 1000.0
) -> NoisedBatch:
    """Mochi's convention: the same x_s, timestep = scale * (1 - s), target x0 - noise."""
    batch = flow_matching(latents, levels, generator, timestep_scale)
    return NoisedBatch(batch.noisy, timestep_scale - batch.timesteps, -batch.target)


def ddpm(
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    prediction: Literal["v_prediction", "epsilon"] = "v_prediction",
) -> NoisedBatch:
    """DDPM forward process with integer timesteps t ~ U{0..T-1} from the scheduler's alpha-bar table.

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (or the noise).
    The v loss equals the x0 loss weighted by 1 / (1 - a_t) used by CogVideoX's own fine-tuning scripts.
    """
    batch = latents.shape[0]
    timesteps = torch.randint(
        0, alphas_cumprod.shape[0], (batch,), generator=generator, device=generator.device
    )
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
    table = alphas_cumprod.to(timesteps.device, torch.float64)
    alpha_bar = table[timesteps].to(latents).view(-1, *([1] * (latents.ndim - 1)))
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    target = (
        alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents if prediction == "v_prediction" else noise
    )
    return NoisedBatch(noisy, timesteps.to(latents.device), target)
