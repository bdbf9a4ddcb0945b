"""The published transformer configs of the README's families, built on the meta device (no memory, no
weights), with CREPA and RepVideo installed, run one forward at the shape users train at; the grid
CREPA captures must be the one written out here by hand from the pixel size, the VAE's compression and
the patch size, and the registry must name the right family.

Configs are the ``transformer/config.json`` of the hub checkpoints (values typed in from them).
"""

from __future__ import annotations

from contextlib import nullcontext

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_cosmos
from torch.fx.experimental import _config as fx_config

from crepa import CrepaConfig, CrepaRegularizer
from crepa.models.conditioning import transformer_inputs
from crepa.models.registry import detect_family
from crepa.repvideo import install_repvideo

_COGVIDEOX_5B = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=64,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=16,
    max_text_seq_length=226,
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    num_attention_heads=48,
    num_layers=42,
    out_channels=16,
    patch_size=2,
    sample_frames=49,
    sample_height=60,
    sample_width=90,
    spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0,
    text_embed_dim=4096,
    time_embed_dim=512,
    timestep_activation_fn="silu",
    use_learned_positional_embeddings=False,
    use_rotary_positional_embeddings=True,
)
_WAN_14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

# name -> (class, config, pixel frames x height x width, latent frames fed, expected family, token grid)
REAL = {
    "CogVideoX-5B": (
        "CogVideoXTransformer3DModel",
        _COGVIDEOX_5B,
        (49, 480, 720),
        13,
        "cogvideox",
        (13, 30, 45),
    ),
    # 81 frames -> 21 latent frames; the pipeline pads one in front (22) for the temporal patch of 2
    "CogVideoX1.5-5B": (
        "CogVideoXTransformer3DModel",
        {
            **_COGVIDEOX_5B,
            "patch_size_t": 2,
            "patch_bias": False,
            "sample_frames": 81,
            "sample_height": 300,
            "sample_width": 300,
        },
        (81, 768, 1360),
        22,
        "cogvideox",
        (11, 48, 85),
    ),
    "CogVideoX-5B-I2V": (
        "CogVideoXTransformer3DModel",
        {**_COGVIDEOX_5B, "in_channels": 32, "use_learned_positional_embeddings": True},
        (49, 480, 720),
        13,
        "cogvideox_i2v",
        (13, 30, 45),
    ),
    "HunyuanVideo": (
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=4096,
            pooled_projection_dim=768,
            rope_theta=256.0,
            rope_axes_dim=(16, 56, 56),
        ),
        (129, 720, 1280),
        33,
        "hunyuanvideo",
        (33, 45, 80),
    ),
    "Wan2.1-T2V-14B": ("WanTransformer3DModel", _WAN_14B, (81, 480, 832), 21, "wan", (21, 30, 52)),
    "Wan2.1-T2V-1.3B": (
        "WanTransformer3DModel",
        {**_WAN_14B, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        (81, 480, 832),
        21,
        "wan",
        (21, 30, 52),
    ),
    "Wan2.1-I2V-14B-480P": (
        "WanTransformer3DModel",
        {**_WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
        (81, 480, 832),
        21,
        "wan_i2v",
        (21, 30, 52),
    ),
    "SkyReels-V2-T2V-14B-540P": (
        "SkyReelsV2Transformer3DModel",
        _WAN_14B,
        (97, 544, 960),
        25,
        "skyreels_v2",
        (25, 34, 60),
    ),
    "LTX-Video": (
        "LTXVideoTransformer3DModel",
        dict(
            in_channels=128,
            out_channels=128,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=32,
            attention_head_dim=64,
            cross_attention_dim=2048,
            num_layers=28,
            activation_fn="gelu-approximate",
            qk_norm="rms_norm_across_heads",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=4096,
            attention_bias=True,
            attention_out_bias=True,
        ),
        (161, 512, 768),
        21,
        "ltx_video",
        (21, 16, 24),
    ),
    "Mochi-1": (
        "MochiTransformer3DModel",
        dict(
            patch_size=2,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=48,
            pooled_projection_dim=1536,
            in_channels=12,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=4096,
            time_embed_dim=256,
            activation_fn="swiglu",
            max_sequence_length=256,
        ),
        (85, 480, 848),
        15,
        "mochi",
        (15, 30, 53),
    ),
    "Cosmos-1.0-Diffusion-7B-Text2World": (
        "CosmosTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=32,
            attention_head_dim=128,
            num_layers=28,
            mlp_ratio=4.0,
            text_embed_dim=1024,
            adaln_lora_dim=256,
            max_size=(128, 240, 240),
            patch_size=(1, 2, 2),
            rope_scale=(2.0, 1.0, 1.0),
            concat_padding_mask=True,
            extra_pos_embed_type="learnable",
        ),
        (121, 704, 1280),
        16,
        "cosmos",
        (16, 44, 80),
    ),
    # non-causal VAE: 88 frames -> 22 latent frames
    "Allegro": (
        "AllegroTransformer3DModel",
        dict(
            patch_size=2,
            patch_size_t=1,
            num_attention_heads=24,
            attention_head_dim=96,
            in_channels=4,
            out_channels=4,
            num_layers=32,
            cross_attention_dim=2304,
            attention_bias=True,
            sample_height=90,
            sample_width=160,
            sample_frames=22,
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=4096,
            interpolation_scale_h=2.0,
            interpolation_scale_w=2.0,
            interpolation_scale_t=2.2,
        ),
        (88, 720, 1280),
        22,
        "allegro",
        (22, 45, 80),
    ),
}
TEXT_WIDTH_KEYS = ("text_embed_dim", "text_dim", "caption_channels")


class _NearestResize:
    """Stand-in for torchvision's ``transforms.functional`` in Cosmos' padding-mask resize (crepa does
    not depend on torchvision): nearest-neighbour resize of a (B, 1, H, W) mask, shape-exact on meta."""

    class InterpolationMode:
        NEAREST = "nearest"

    class functional:
        @staticmethod
        def resize(mask: torch.Tensor, size: list[int], interpolation=None) -> torch.Tensor:
            return F.interpolate(mask, size=tuple(size), mode="nearest")


def _autocast_allowing_meta(original):
    """Mochi's forward opens ``torch.autocast(device_type=hidden_states.device.type, enabled=False)``;
    autocast rejects the meta device, so on meta this is a no-op (as the disabled autocast is anyway)."""

    def autocast(device_type: str, *args, **kwargs):
        return nullcontext() if device_type == "meta" else original(device_type, *args, **kwargs)

    return autocast


FAST = {"CogVideoX-5B"}  # the rest take 3-9 s each on 2 cores: slow suite


@pytest.mark.parametrize(
    "name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in REAL]
)
def test_published_config_forward_on_meta_captures_the_registry_grid(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class_name, config, (_, height, width), latent_frames, family_name, expected_grid = REAL[name]
    monkeypatch.setattr(transformer_cosmos, "transforms", _NearestResize, raising=False)
    monkeypatch.setattr(torch, "autocast", _autocast_allowing_meta(torch.autocast))
    # Mochi packs text tokens with nonzero(mask); the mask here is all ones, which is what torch's
    # meta kernel then assumes.
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True, raising=False)
    with torch.device("meta"):
        transformer = getattr(diffusers, class_name)(**config)
    family = detect_family(transformer)
    assert family.name == family_name
    assert (height // family.spatial_ratio, width // family.spatial_ratio) == tuple(
        size * patch
        for size, patch in zip(expected_grid[1:], family.patch_sizes(transformer)[1:], strict=True)
    )
    block = family.default_block_index
    regularizer = CrepaRegularizer(transformer, CrepaConfig(block_index=block), teacher_dim=1536)
    gates = install_repvideo(transformer, window=6, gate_init=0.5)
    text_width = next(config[key] for key in TEXT_WIDTH_KEYS if key in config)
    text_length = config.get("max_text_seq_length", 64)
    with torch.device("meta"):
        channels = transformer.config.out_channels or transformer.config.in_channels
        latents = torch.empty(
            1, channels, latent_frames, height // family.spatial_ratio, width // family.spatial_ratio
        )
        text = {
            "prompt_embeds": torch.empty(1, text_length, text_width),
            "prompt_attention_mask": torch.ones(1, text_length, dtype=torch.bool),
        }
        if "pooled_projection_dim" in config:
            text["pooled_prompt_embeds"] = torch.empty(1, config["pooled_projection_dim"])
        image = {}
        if family_name == "cogvideox_i2v":
            image = {"image_latents": torch.empty(1, 16, 1, *latents.shape[3:])}
        if family_name == "wan_i2v":
            image = {
                "condition_latents": torch.empty_like(latents),
                "image_embeds": torch.empty(1, 257, 1280),
            }
        inputs = transformer_inputs(
            transformer, family, latents, torch.full((1,), 500.0), text, guidance=6.0, image=image
        )
        with torch.no_grad():
            output = transformer(**inputs)[0]
    assert regularizer.capture.grid_size == expected_grid
    captured = regularizer.capture.pop()
    width_c = config["num_attention_heads"] * config["attention_head_dim"]
    assert captured.shape == (1, *expected_grid, width_c)
    assert gates.depth == len(family.blocks(transformer))
    assert output.shape[0] == 1
