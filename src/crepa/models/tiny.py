"""Tiny configurations of every registered family, and forward inputs for them.

The sizes are those diffusers uses in its own unit tests (tests/models/transformers), with the
few changes noted next to each config. They build in milliseconds on a CPU; used by the tests,
the benchmarks and the demo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from torch import nn

from crepa.models.registry import detect_family, get_family


@dataclass(frozen=True)
class TinyModel:
    """A tiny config of a registry family: ``family`` name and the transformer's init kwargs."""

    family: str
    config: dict[str, Any]


_COGVIDEOX = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    time_embed_dim=2,
    text_embed_dim=8,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=8,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=8,
)
_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
_COSMOS = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=12,
    num_layers=2,
    mlp_ratio=2,
    text_embed_dim=16,
    adaln_lora_dim=4,
    max_size=(4, 32, 32),
    patch_size=(1, 2, 2),
    rope_scale=(2.0, 1.0, 1.0),
    # diffusers resizes the padding mask with torchvision, which crepa does not depend on; the mask
    # is one extra input channel before the patch embedding and does not change the token grid.
    concat_padding_mask=False,
    extra_pos_embed_type="learnable",
)

TINY_MODELS: dict[str, TinyModel] = {
    "cogvideox": TinyModel("cogvideox", _COGVIDEOX),
    # CogVideoX 1.5: 2 latent frames per token, RoPE. get_3d_rotary_pos_embed needs a head width
    # divisible by 16 (diffusers' test enables RoPE with width 8 but never passes the embedding).
    "cogvideox_1_5": TinyModel(
        "cogvideox",
        {**_COGVIDEOX, "attention_head_dim": 16, "patch_size_t": 2, "use_rotary_positional_embeddings": True},
    ),
    # diffusers' test uses patch 1; the released model (and this config) patches 2x2.
    "hunyuanvideo": TinyModel(
        "hunyuanvideo",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        ),
    ),
    "wan": TinyModel("wan", _WAN),
    # Wan 2.2 TI2V-5B is told apart by its 48 latent channels.
    "wan2_2_ti2v": TinyModel("wan2_2_ti2v", {**_WAN, "in_channels": 48, "out_channels": 48}),
    "skyreels_v2": TinyModel("skyreels_v2", _WAN),
    "ltx_video": TinyModel(
        "ltx_video",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=1,
            qk_norm="rms_norm_across_heads",
            caption_channels=16,
        ),
    ),
    "mochi": TinyModel(
        "mochi",
        dict(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=4,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=16,
            time_embed_dim=4,
            activation_fn="swiglu",
            max_sequence_length=16,
        ),
    ),
    "cosmos": TinyModel("cosmos", _COSMOS),
    "cosmos_predict2": TinyModel("cosmos_predict2", {**_COSMOS, "extra_pos_embed_type": None}),
    "allegro": TinyModel(
        "allegro",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            cross_attention_dim=16,
            sample_width=8,
            sample_height=8,
            sample_frames=8,
            caption_channels=8,
        ),
    ),
}


def tiny_transformer(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised fp32 tiny transformer: ``name`` is a key of :data:`TINY_MODELS`."""
    if name not in TINY_MODELS:
        raise ValueError(f"no tiny config called {name!r}; available: {', '.join(TINY_MODELS)}")
    tiny = TINY_MODELS[name]
    cls = getattr(diffusers, get_family(tiny.family).class_names[0])
    torch.manual_seed(seed)
    return cls(**{**tiny.config, **overrides})


# Builders of the conditioning inputs, per family:
# (transformer, batch, frames, height, width, draw) -> kwargs, with draw(*shape) a random tensor.
Draw = Callable[..., torch.Tensor]


def _text(transformer: nn.Module, batch: int, draw: Draw, length: int, width_key: str) -> torch.Tensor:
    return draw(batch, length, transformer.config[width_key])


def _cogvideox_inputs(
    transformer: nn.Module, batch: int, frames: int, height: int, width: int, draw: Draw
) -> dict:
    config = transformer.config
    inputs: dict[str, Any] = {"encoder_hidden_states": _text(transformer, batch, draw, 8, "text_embed_dim")}
    if config.use_rotary_positional_embeddings:
        patch_t, patch_h, patch_w = get_family("cogvideox").patch_sizes(transformer)
        grid = (height // patch_h, width // patch_w)
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim,
            crops_coords=((0, 0), grid),
            grid_size=grid,
            temporal_size=frames // patch_t,
        )
    return inputs


def _hunyuanvideo_inputs(
    transformer: nn.Module, batch: int, frames: int, height: int, width: int, draw: Draw
) -> dict:
    config = transformer.config
    inputs = {
        "encoder_hidden_states": _text(transformer, batch, draw, 12, "text_embed_dim"),
        "encoder_attention_mask": torch.ones(batch, 12),
        "pooled_projections": draw(batch, config.pooled_projection_dim),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full(
            (batch,), 6000.0
        )  # guidance scale 6 x 1000, as the pipeline passes it
    return inputs


def _wan_inputs(transformer: nn.Module, batch: int, frames: int, height: int, width: int, draw: Draw) -> dict:
    return {"encoder_hidden_states": _text(transformer, batch, draw, 12, "text_dim")}


def _ltx_inputs(transformer: nn.Module, batch: int, frames: int, height: int, width: int, draw: Draw) -> dict:
    family = get_family("ltx_video")
    frame_rate = 25
    return {
        "encoder_hidden_states": _text(transformer, batch, draw, 16, "caption_channels"),
        "encoder_attention_mask": torch.ones(batch, 16, dtype=torch.bool),
        "rope_interpolation_scale": (
            family.temporal_ratio / frame_rate,
            family.spatial_ratio,
            family.spatial_ratio,
        ),
    }


def _mochi_inputs(
    transformer: nn.Module, batch: int, frames: int, height: int, width: int, draw: Draw
) -> dict:
    return {
        "encoder_hidden_states": _text(transformer, batch, draw, 16, "text_embed_dim"),
        "encoder_attention_mask": torch.ones(batch, 16, dtype=torch.bool),
    }


def _cosmos_inputs(
    transformer: nn.Module, batch: int, frames: int, height: int, width: int, draw: Draw
) -> dict:
    return {
        "encoder_hidden_states": _text(transformer, batch, draw, 12, "text_embed_dim"),
        "fps": 30,
        "padding_mask": torch.zeros(batch, 1, height, width),
    }


def _allegro_inputs(
    transformer: nn.Module, batch: int, frames: int, height: int, width: int, draw: Draw
) -> dict:
    # The pipeline also passes Allegro's RoPE, which needs a head width divisible by 6; the tiny
    # config (width 8, as in diffusers' tests) runs without it.
    return {
        "encoder_hidden_states": _text(transformer, batch, draw, 16, "caption_channels"),
        "encoder_attention_mask": torch.ones(batch, 16),
    }


_CONDITIONING: dict[str, Callable[..., dict]] = {
    "cogvideox": _cogvideox_inputs,
    "hunyuanvideo": _hunyuanvideo_inputs,
    "wan": _wan_inputs,
    "wan2_2_ti2v": _wan_inputs,
    "skyreels_v2": _wan_inputs,
    "ltx_video": _ltx_inputs,
    "mochi": _mochi_inputs,
    "cosmos": _cosmos_inputs,
    "cosmos_predict2": _cosmos_inputs,
    "allegro": _allegro_inputs,
}


def tiny_inputs(
    family_name: str,
    transformer: nn.Module,
    batch: int = 2,
    frames: int = 3,
    height: int = 8,
    width: int = 12,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Random forward kwargs for ``transformer`` of ``family_name`` (a family or a tiny-config name).

    frames, height, width: latent sizes (latent frames, rows, columns). The latents
    (batch, in_channels, frames, height, width) go into ``hidden_states`` in the family's layout
    (with num_frames / height / width for packed inputs); timestep, text states and the
    family-specific inputs come alongside.
    """
    family = get_family(TINY_MODELS[family_name].family if family_name in TINY_MODELS else family_name)
    detected = detect_family(transformer)
    if detected is not family:
        raise ValueError(f"the transformer belongs to family {detected.name!r}, not {family.name!r}")

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    latents = draw(batch, transformer.config.in_channels, frames, height, width)
    return {
        **family.latent_kwargs(transformer, latents),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator).float(),
        **_CONDITIONING[family.name](transformer, batch, frames, height, width, draw),
    }
