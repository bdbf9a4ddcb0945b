"""The demo's latent space: a fixed linear video autoencoder with the compression of CogVideoX's VAE.

Each latent pixel stands for an 8x8 patch of 4 frames (frame 0 alone, as in causal video VAEs):
pixel-unshuffle three times (3 -> 12 -> 48 -> 192 channels), stack the 4 frames (768 channels),
then project onto the ``latent_channels`` leading principal components of such blocks in the
generic split. The projection is fitted in closed form (seconds, deterministic), not trained.

Why not a pure pixel shuffle: its 768 channels exceed a tiny transformer's width, and the output
projection (rank <= width) leaves the channels it cannot reach at their initial noise when
sampling. Why not a trained diffusers VAE: one optimisation step of the smallest
``AutoencoderKLWan`` takes seconds on 2 CPU cores, so the demo's budget would go to the VAE alone.

It is a diffusers model (``ModelMixin`` + ``ConfigMixin``), saved in the pipeline folder with
``save_pretrained`` and loaded by ``CogVideoXPipeline.from_pretrained`` like the real VAE: the
pipeline reads ``block_out_channels`` (spatial factor 2^(len - 1)), ``temporal_compression_ratio``
and ``scaling_factor`` from its config and calls ``encode(...).latent_dist`` / ``decode(...).sample``.
diffusers loads a component of another library only when its module is imported, so this module
is imported by the ``crepa`` commands that load a pipeline (``crepa.cli._components``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

_LOG_VARIANCE = -30.0  # the posterior is a point: mode() and sample() agree


class PCAVideoAutoencoder(ModelMixin, ConfigMixin):
    """Frames (B, 3, 1 + 4m, H, W) in [-1, 1] <-> latents (B, latent_channels, 1 + m, H/8, W/8).

    block_out_channels: channels after each 2x space-to-channel level (the pipeline derives the
    spatial factor from its length); scaling_factor: multiplies latents for the diffusion model
    (CogVideoX's normalisation), set by :func:`fit_pca_autoencoder` so their mean variance is 1.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        temporal_compression_ratio: int = 4,
        block_out_channels: tuple[int, ...] = (3, 12, 48, 192),
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.spatial_ratio = 2 ** (len(block_out_channels) - 1)
        block = 3 * temporal_compression_ratio * self.spatial_ratio**2
        if latent_channels > block:
            raise ValueError(f"latent_channels {latent_channels} exceeds the block size {block}")
        # Frozen weights (nn.Parameter so that dtype / device follow the model like any VAE's).
        self.mean = nn.Parameter(torch.zeros(block), requires_grad=False)
        self.basis = nn.Parameter(torch.eye(block)[:, :latent_channels].contiguous(), requires_grad=False)

    def to_blocks(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1 + r*m, H, W) -> (B, 1 + m, H/s, W/s, 3*r*s*s); frame 0 is repeated r times."""
        ratio, side = self.config.temporal_compression_ratio, self.spatial_ratio
        batch, channels, count, height, width = frames.shape
        if (count - 1) % ratio:
            raise ValueError(f"{count} frames: this autoencoder needs 1 + {ratio}*m frames")
        if height % side or width % side:
            raise ValueError(f"frame size {height}x{width} is not a multiple of {side}")
        grouped = torch.cat([frames[:, :, :1].expand(-1, -1, ratio, -1, -1), frames[:, :, 1:]], dim=2)
        grouped = grouped.reshape(batch, channels, -1, ratio, height // side, side, width // side, side)
        # (B, F, h, w, C, r, s, s): the block's values ordered channel, frame, row, column.
        return grouped.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`; frame 0 is the mean of its r copies."""
        ratio, side = self.config.temporal_compression_ratio, self.spatial_ratio
        batch, latent_frames, rows, cols, _ = blocks.shape
        grid = blocks.reshape(batch, latent_frames, rows, cols, 3, ratio, side, side)
        frames = grid.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(
            batch, 3, latent_frames * ratio, rows * side, cols * side
        )
        return torch.cat([frames[:, :, :ratio].mean(dim=2, keepdim=True), frames[:, :, ratio:]], dim=2)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Frames (B, 3, T, H, W) in [-1, 1] -> a point posterior over latents (B, C, F, h, w)."""
        latents = ((self.to_blocks(x) - self.mean) @ self.basis).permute(0, 4, 1, 2, 3)
        parameters = torch.cat([latents, torch.full_like(latents, _LOG_VARIANCE)], dim=1)
        posterior = DiagonalGaussianDistribution(parameters)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Latents (B, C, F, h, w) -> frames (B, 3, 1 + r(F - 1), H, W), clamped to [-1, 1]."""
        blocks = z.permute(0, 2, 3, 4, 1) @ self.basis.T + self.mean
        frames = self.from_blocks(blocks).clamp(-1, 1)
        return DecoderOutput(sample=frames) if return_dict else (frames,)


def fit_pca_autoencoder(
    clips: Iterable[np.ndarray], latent_channels: int, temporal_compression_ratio: int = 4
) -> PCAVideoAutoencoder:
    """Fit the projection to uint8 clips (T, H, W, 3): mean block and leading principal components
    (float64 eigen-decomposition, signs fixed so the largest entry of each is positive)."""
    model = PCAVideoAutoencoder(latent_channels, temporal_compression_ratio)
    blocks = []
    for clip in clips:
        frames = torch.from_numpy(clip).permute(3, 0, 1, 2).unsqueeze(0).double() / 127.5 - 1
        blocks.append(model.to_blocks(frames).flatten(0, 3))
    data = torch.cat(blocks)
    mean = data.mean(dim=0)
    centred = data - mean
    variances, vectors = torch.linalg.eigh(centred.T @ centred / len(data))
    order = torch.argsort(variances, descending=True)[:latent_channels]
    basis = vectors[:, order]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    basis = basis * signs
    kept = variances[order].clamp_min(1e-12)
    model.register_to_config(scaling_factor=float(1.0 / kept.mean().sqrt()))
    with torch.no_grad():
        model.mean.copy_(mean.float())
        model.basis.copy_(basis.float())
    return model
