"""Image-to-video conditioning, computed and fed as the family's diffusers pipeline does it.

Two halves per I2V family (tables keyed by registry name):

- :data:`IMAGE_ENCODERS` (precompute): what the pipeline computes from its input image, here from
  the clip's clean first frame, stored with the clip's latents:
  CogVideoX-I2V ``image_latents`` (C, 1, h, w): normalised VAE latents of frame 0 alone;
  Wan I2V ``condition_latents`` (C, F, h, w): normalised latents of [frame 0, then grey (zero)
  frames] and, when the transformer has ``image_dim`` (Wan 2.1), ``image_embeds`` (257, 1280): the
  CLIP vision tower's penultimate hidden states of frame 0.
- :data:`IMAGE_INPUTS` (training step): noisy latents (B, C, F, h, w) + those cached tensors -> the
  transformer's input latents and extra kwargs, as the pipeline's denoising loop builds them.

Unlike the pipelines (which sample the VAE posterior for CogVideoX), the cached latents are the
posterior's mode, as for the clip latents: precompute is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from crepa.models.pipelines import PipelineComponents, encode_latents

ImageEncoder = Callable[[PipelineComponents, torch.Tensor], dict[str, torch.Tensor]]
ImageInputs = Callable[
    [nn.Module, Mapping[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, Any]]
]


@torch.no_grad()
def _cogvideox_encode(components: PipelineComponents, frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """frames (T, 3, H, W) in [0, 1] -> {"image_latents": (C, 1, h, w)} (CogVideoXImageToVideoPipeline.prepare_latents)."""
    vae = components.vae
    latents = encode_latents(vae, frames[:1].permute(1, 0, 2, 3).unsqueeze(0).mul(2).sub(1))[0]
    if getattr(vae.config, "invert_scale_latents", False):  # the pipeline divides instead of multiplying
        latents = latents / vae.config.scaling_factor**2
    return {"image_latents": latents}


def _cogvideox_inputs(
    transformer: nn.Module, image: Mapping[str, torch.Tensor], noisy: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """[noisy latents, image latents of frame 0 then zeros] on the channels; ``ofs`` = 2 for 1.5-I2V."""
    first = image["image_latents"].to(noisy)  # (B, C, 1, h, w)
    padding = first.new_zeros(first.shape[0], first.shape[1], noisy.shape[2] - 1, *first.shape[3:])
    hidden = torch.cat([noisy, torch.cat([first, padding], dim=2)], dim=1)
    extra: dict[str, Any] = {}
    if transformer.config.get("ofs_embed_dim") is not None:
        extra["ofs"] = noisy.new_full((1,), 2.0)
    return hidden, extra


@torch.no_grad()
def _wan_encode(components: PipelineComponents, frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """frames (T, 3, H, W) in [0, 1] -> condition latents (C, F, h, w) [+ CLIP image states (L, D)]
    (WanImageToVideoPipeline.prepare_latents / encode_image)."""
    pipeline = components.pipeline
    video = torch.cat([frames[:1].mul(2).sub(1), frames.new_zeros(frames.shape[0] - 1, *frames.shape[1:])])
    parts = {"condition_latents": encode_latents(pipeline.vae, video.permute(1, 0, 2, 3).unsqueeze(0))[0]}
    if components.transformer_config.get("image_dim") is not None:
        if getattr(pipeline, "image_encoder", None) is None:
            raise ValueError(
                f"{components.source}: the transformer cross-attends to CLIP image states (image_dim) but the "
                "pipeline has no image_encoder / image_processor"
            )
        first = frames[0].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        encoder = pipeline.image_encoder
        pixels = pipeline.image_processor(images=first, return_tensors="pt").pixel_values
        states = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype), output_hidden_states=True)
        parts["image_embeds"] = states.hidden_states[-2][0]
    return parts


def first_frame_mask(condition: torch.Tensor, temporal_ratio: int) -> torch.Tensor:
    """(B, r, F, h, w) mask for condition latents (B, C, F, h, w): ones for latent frame 0 (the r
    pixel-frame slots of the given image), zeros elsewhere, as WanImageToVideoPipeline builds it."""
    batch, _, frames, height, width = condition.shape
    mask = condition.new_zeros(batch, temporal_ratio, frames, height, width)
    mask[:, :, 0] = 1
    return mask


def _wan_inputs(
    transformer: nn.Module, image: Mapping[str, torch.Tensor], noisy: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """[noisy latents, first-frame mask, condition latents] on the channels; CLIP states beside the text."""
    condition = image["condition_latents"].to(noisy)
    mask_channels = transformer.config.in_channels - noisy.shape[1] - condition.shape[1]
    hidden = torch.cat([noisy, first_frame_mask(condition, mask_channels), condition], dim=1)
    extra: dict[str, Any] = {}
    if "image_embeds" in image:
        extra["encoder_hidden_states_image"] = image["image_embeds"].to(noisy)
    return hidden, extra


IMAGE_ENCODERS: dict[str, ImageEncoder] = {"cogvideox_i2v": _cogvideox_encode, "wan_i2v": _wan_encode}
IMAGE_INPUTS: dict[str, ImageInputs] = {"cogvideox_i2v": _cogvideox_inputs, "wan_i2v": _wan_inputs}
IMAGE_KEYS = ("image_latents", "condition_latents", "image_embeds")
"""Names of the cached image-conditioning tensors (stored in the latents part)."""


def image_parts(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The image-conditioning tensors of a batch (empty for text-to-video caches)."""
    return {key: batch[key] for key in IMAGE_KEYS if key in batch}
