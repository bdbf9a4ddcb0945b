"""Per-family forward inputs besides the latents: text states, masks, RoPE, guidance.

``text`` is what the pipeline's ``encode_prompt`` gave (and the cache stores): ``prompt_embeds``
(B, L, D_text), and where the family has them ``prompt_attention_mask`` (B, L) and
``pooled_prompt_embeds`` (B, D_pool). One builder per family, in a table keyed by family name;
the training loop, validation and the tiny test inputs all go through :func:`transformer_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from torch import nn

from crepa.models.image_conditioning import IMAGE_INPUTS, IMAGE_KEYS
from crepa.models.registry import ModelFamily


@dataclass(frozen=True)
class ConditioningContext:
    """What builders may need beyond the text: the latent size and the clip's frame rate."""

    latent_frames: int
    latent_height: int
    latent_width: int
    frame_rate: float = 25.0
    guidance: float = 1.0  # guidance-distilled models (HunyuanVideo): the scale fed to the guidance embedder


Builder = Callable[[nn.Module, ModelFamily, Mapping[str, torch.Tensor], ConditioningContext], dict[str, Any]]


TEXT_WIDTH_KEYS = ("text_embed_dim", "text_dim", "caption_channels")  # config keys naming the text width


def text_width(config: Mapping[str, Any]) -> int:
    """Width D_text of the text states a transformer config takes."""
    return int(next(config[key] for key in TEXT_WIDTH_KEYS if config.get(key)))


def _mask(text: Mapping[str, torch.Tensor]) -> torch.Tensor:
    embeds = text["prompt_embeds"]
    mask = text.get("prompt_attention_mask")
    return mask if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)


def _text_only(transformer, family, text, context) -> dict[str, Any]:
    return {"encoder_hidden_states": text["prompt_embeds"]}


def _text_and_mask(transformer, family, text, context) -> dict[str, Any]:
    return {"encoder_hidden_states": text["prompt_embeds"], "encoder_attention_mask": _mask(text)}


def _cogvideox(transformer, family, text, context) -> dict[str, Any]:
    """CogVideoX: RoPE frequencies from the caller when the model uses rotary embeddings (5B, 1.5)."""
    config = transformer.config
    inputs: dict[str, Any] = {"encoder_hidden_states": text["prompt_embeds"]}
    if not config.use_rotary_positional_embeddings:
        return inputs
    patch_t, patch_h, patch_w = family.patch_sizes(transformer)
    grid = (context.latent_height // patch_h, context.latent_width // patch_w)
    base = (config.sample_height // patch_h, config.sample_width // patch_w)
    device = text["prompt_embeds"].device
    if config.patch_size_t is None:  # 1.0: crop region of the base grid, as the pipeline does
        crops = get_resize_crop_region_for_grid(grid, base[1], base[0])
        cos, sin = get_3d_rotary_pos_embed(
            config.attention_head_dim, crops, grid, context.latent_frames, device=device
        )
    else:  # 1.5: sliced from the maximum grid
        cos, sin = get_3d_rotary_pos_embed(
            config.attention_head_dim,
            None,
            grid,
            (context.latent_frames + patch_t - 1) // patch_t,
            grid_type="slice",
            max_size=base,
            device=device,
        )
    inputs["image_rotary_emb"] = (cos, sin)
    return inputs


def _hunyuanvideo(transformer, family, text, context) -> dict[str, Any]:
    embeds = text["prompt_embeds"]
    inputs: dict[str, Any] = {
        "encoder_hidden_states": embeds,
        "encoder_attention_mask": _mask(text),
        "pooled_projections": text["pooled_prompt_embeds"],
    }
    if transformer.config.guidance_embeds:  # the pipeline feeds guidance_scale * 1000
        inputs["guidance"] = torch.full((embeds.shape[0],), context.guidance * 1000.0, device=embeds.device)
    return inputs


def _ltx(transformer, family, text, context) -> dict[str, Any]:
    ratio_s = family.spatial_ratio
    return {
        **_text_and_mask(transformer, family, text, context),
        "rope_interpolation_scale": (family.temporal_ratio / context.frame_rate, ratio_s, ratio_s),
    }


def _cosmos(transformer, family, text, context) -> dict[str, Any]:
    embeds = text["prompt_embeds"]
    height = context.latent_height * family.spatial_ratio
    width = context.latent_width * family.spatial_ratio
    return {
        "encoder_hidden_states": embeds,
        "fps": round(context.frame_rate),
        "padding_mask": torch.zeros(embeds.shape[0], 1, height, width, device=embeds.device),
    }


CONDITIONING: dict[str, Builder] = {
    "cogvideox": _cogvideox,
    "cogvideox_i2v": _cogvideox,
    "wan_i2v": _text_only,
    "hunyuanvideo": _hunyuanvideo,
    "wan": _text_only,
    "wan2_2_ti2v": _text_only,
    "skyreels_v2": _text_only,
    "ltx_video": _ltx,
    "mochi": _text_and_mask,
    "cosmos": _cosmos,
    "cosmos_predict2": _cosmos,
    "allegro": _text_and_mask,
}


def transformer_inputs(
    transformer: nn.Module,
    family: ModelFamily,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: Mapping[str, torch.Tensor],
    *,
    frame_rate: float = 25.0,
    guidance: float = 1.0,
    image: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Forward kwargs for ``transformer`` from latents (B, C, F, H, W), timesteps (B,) and text states.

    image: the cached image conditioning of image-to-video families
    (:mod:`crepa.models.image_conditioning`), joined to the latents as the family's pipeline does.
    """
    if family.name not in CONDITIONING:
        raise ValueError(
            f"no conditioning builder for family {family.name!r}; known: {', '.join(CONDITIONING)}"
        )
    _, _, frames, height, width = noisy_latents.shape
    context = ConditioningContext(frames, height, width, frame_rate, guidance)
    latents, extra = noisy_latents, {}
    if family.name in IMAGE_INPUTS:
        if not image:
            raise ValueError(
                f"{family.name} is image-to-video: the batch needs its image conditioning "
                f"({', '.join(IMAGE_KEYS)}); precompute the cache with this model"
            )
        latents, extra = IMAGE_INPUTS[family.name](transformer, image, noisy_latents)
    return {
        **family.latent_kwargs(transformer, latents),
        "timestep": timesteps,
        **CONDITIONING[family.name](transformer, family, text, context),
        **extra,
        "return_dict": False,
    }


def prediction_to_latents(
    transformer: nn.Module, family: ModelFamily, prediction: torch.Tensor, latents_shape: torch.Size
) -> torch.Tensor:
    """The transformer's output in the latents' layout (B, C, F, H, W) (inverse of ``latent_kwargs``)."""
    if family.layout == "BCFHW":
        return prediction
    if family.layout == "BFCHW":
        return prediction.transpose(1, 2)
    batch, channels, frames, height, width = latents_shape
    patch_t, patch_h, patch_w = family.patch_sizes(transformer)
    grid = prediction.reshape(
        batch, frames // patch_t, height // patch_h, width // patch_w, channels, patch_t, patch_h, patch_w
    )
    return grid.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(latents_shape)
