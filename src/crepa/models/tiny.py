"""Tiny configurations of every registered family, and forward inputs for them.

The sizes are those diffusers uses in its own unit tests (tests/models/transformers), with the
few changes noted next to each config. They build in milliseconds on a CPU; used by the tests,
the benchmarks and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from torch import nn

from crepa.models.conditioning import text_width, transformer_inputs
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
    # divisible by 16, and 1.5 slices its RoPE from the sample grid, which bounds the latent size
    # (diffusers' test enables RoPE with width 8 and an 8x8 sample but never passes the embedding).
    "cogvideox_1_5": TinyModel(
        "cogvideox",
        {
            **_COGVIDEOX,
            "attention_head_dim": 16,
            "patch_size_t": 2,
            "use_rotary_positional_embeddings": True,
            "sample_height": 16,
            "sample_width": 16,
        },
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


TEXT_LENGTH = 8  # CogVideoX needs exactly max_text_seq_length text tokens (8 in its tiny config)


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

    frames, height, width: latent sizes (latent frames, rows, columns). Random latents
    (batch, in_channels, frames, height, width), timesteps in [0, 1000) and text states
    (batch, 8, text width) go through :func:`crepa.models.conditioning.transformer_inputs`, so the
    family-specific inputs are those of training. ``return_dict`` is left to the caller.
    """
    family = get_family(TINY_MODELS[family_name].family if family_name in TINY_MODELS else family_name)
    detected = detect_family(transformer)
    if detected is not family:
        raise ValueError(f"the transformer belongs to family {detected.name!r}, not {family.name!r}")
    config = transformer.config
    text = {
        "prompt_embeds": torch.randn(batch, TEXT_LENGTH, text_width(config), generator=generator),
        "prompt_attention_mask": torch.ones(batch, TEXT_LENGTH, dtype=torch.bool),
    }
    if "pooled_projection_dim" in config:
        text["pooled_prompt_embeds"] = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    latents = torch.randn(batch, config.in_channels, frames, height, width, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).float()
    inputs = transformer_inputs(transformer, family, latents, timesteps, text, guidance=6.0)
    del inputs["return_dict"]
    return inputs
