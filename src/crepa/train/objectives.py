"""Diffusion training objectives: noise a clean latent batch and say what the model must predict.

One function per objective family of the registry (``ModelFamily.objective``):
flow matching (Wan, HunyuanVideo, LTX-Video, Cosmos Predict 2), its reversed form (Mochi) and DDPM
v / epsilon prediction (CogVideoX, Allegro). Randomness comes from an explicit generator so a
resumed run draws exactly the same noise and timesteps; everything is drawn on the generator's
device (a CUDA generator keeps the step free of host-to-device copies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TimestepSampling = Literal["uniform", "logit_normal", "mode", "shifted"]
LossWeighting = Literal["none", "min_snr", "sigma_sqrt", "cosmap"]
# Weightings defined on the flow-matching noise level s (SD3, Esser et al. 2024): no DDPM meaning.
FLOW_ONLY_WEIGHTINGS = ("sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class NoisedBatch:
    """noisy: model input (B, C, F, H, W); timesteps: (B,) as the transformer expects them;
    target: what the prediction is regressed onto (same shape as noisy); snr: (B,) float32 signal-to-
    noise ratio of ``noisy`` (flow: ((1 - s) / s)^2, DDPM: a_t / (1 - a_t)), read by the loss weights."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    snr: torch.Tensor


def sample_noise_level(
    batch: int,
    generator: torch.Generator,
    sampling: TimestepSampling = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Noise levels s in [0, 1), shape (B,), by the samplers of the SD3 paper (Esser et al. 2024,
    section 3.1): uniform; logit-normal sigmoid(N(mean, std)); mode, s = 1 - u - scale * (cos^2(pi u / 2)
    - 1 + u) with u uniform (heavy tails for scale > 0); shifted, uniform levels meant to be moved by
    ``shift``. Every sampler then applies s' = shift * s / (1 + (shift - 1) * s), which moves mass to
    high noise for large videos."""
    device = generator.device
    if sampling in ("uniform", "shifted"):
        levels = torch.rand(batch, generator=generator, device=device)
    elif sampling == "logit_normal":
        levels = torch.sigmoid(
            logit_mean + logit_std * torch.randn(batch, generator=generator, device=device)
        )
    elif sampling == "mode":
        u = torch.rand(batch, generator=generator, device=device)
        levels = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        raise ValueError(f"timestep sampling must be one of {TimestepSampling.__args__}, got {sampling!r}")
    return shift * levels / (1 + (shift - 1) * levels)


def flow_matching(
    latents: torch.Tensor, levels: torch.Tensor, generator: torch.Generator, timestep_scale: float = 1000.0
) -> NoisedBatch:
    """x_s = (1 - s) x0 + s noise, target noise - x0, timestep = scale * s."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
    s = levels.to(latents).view(-1, *([1] * (latents.ndim - 1)))
    snr = ((1 - levels) / levels).float().square().to(latents.device)
    return NoisedBatch(
        (1 - s) * latents + s * noise, levels.to(latents.device) * timestep_scale, noise - latents, snr
    )


def flow_matching_reversed(
    latents: torch.Tensor, levels: torch.Tensor, generator: torch.Generator, timestep_scale: float = 1000.0
) -> NoisedBatch:
    """Mochi's convention: the same x_s, timestep = scale * (1 - s), target x0 - noise."""
    batch = flow_matching(latents, levels, generator, timestep_scale)
    return NoisedBatch(batch.noisy, timestep_scale - batch.timesteps, -batch.target, batch.snr)


def ddpm(
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    prediction: Literal["v_prediction", "epsilon"] = "v_prediction",
    levels: torch.Tensor | None = None,
) -> NoisedBatch:
    """DDPM forward process with integer timesteps t ~ U{0..T-1} from the scheduler's alpha-bar table,
    or t = floor(s * T) of noise levels ``levels`` (B,) in [0, 1) from :func:`sample_noise_level`.

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (or the noise).
    The v loss equals the x0 loss weighted by 1 / (1 - a_t) used by CogVideoX's own fine-tuning scripts.
    """
    batch, steps = latents.shape[0], alphas_cumprod.shape[0]
    if levels is None:
        timesteps = torch.randint(0, steps, (batch,), generator=generator, device=generator.device)
    else:
        timesteps = (levels.double() * steps).long().clamp(0, steps - 1).to(generator.device)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
    table = alphas_cumprod.to(timesteps.device, torch.float64)
    alpha_bar = table[timesteps].to(latents).view(-1, *([1] * (latents.ndim - 1)))
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    target = (
        alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents if prediction == "v_prediction" else noise
    )
    snr = (table[timesteps] / (1 - table[timesteps])).float().to(latents.device)
    return NoisedBatch(noisy, timesteps.to(latents.device), target, snr)


def loss_weights(
    weighting: LossWeighting, objective: str, snr: torch.Tensor, gamma: float = 5.0
) -> torch.Tensor:
    """Per-sample weights (B,) of the diffusion MSE from the SNR of each noised sample.

    min_snr (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): the x0
    loss weighted by min(SNR, gamma), written for the objective's target: epsilon min(SNR, gamma) / SNR,
    v min(SNR, gamma) / (SNR + 1), flow velocity min(SNR, gamma) * s^2 with s = 1 / (1 + sqrt(SNR))
    (the velocity error is the x0 error / s). sigma_sqrt and cosmap (SD3 paper, Esser et al. 2024, and
    diffusers' ``compute_loss_weighting_for_sd3``), on the flow noise level s: s^-2 and
    2 / (pi (1 - 2 s + 2 s^2)).
    """
    snr = snr.double()
    if weighting == "min_snr":
        clipped = snr.clamp(max=gamma)
        if objective == "epsilon":
            weights = (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, finite at zero terminal SNR
        elif objective == "v_prediction":
            weights = clipped / (snr + 1)
        else:
            weights = clipped / (1 + snr.sqrt()).square()
    elif weighting in FLOW_ONLY_WEIGHTINGS and objective.startswith("flow_matching"):
        sigma = 1 / (1 + snr.sqrt())
        weights = sigma**-2 if weighting == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    else:
        raise ValueError(f"loss weighting {weighting!r} does not apply to the {objective!r} objective")
    return weights.float()


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sample's MSE (B, ...) times its weight (B,), in float32."""
    per_sample = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    return (weights.to(per_sample) * per_sample).mean()
