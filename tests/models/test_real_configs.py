"""The published transformer configs of the README's families, built on the meta device (no memory, no
weights), with CREPA and RepVideo installed, run one forward at the shape users train at; the grid
CREPA captures must be the one written out here by hand from the pixel size, the VAE's compression and
the patch size, and the registry must name the right family.

Configs are the ``transformer/config.json`` of the hub checkpoints (:mod:`crepa.plan.published`); the
shapes each was published for are checked against the library's entries.
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
from crepa.models.conditioning import text_width, transformer_inputs
from crepa.models.registry import detect_family
from crepa.plan.published import PUBLISHED
from crepa.repvideo import install_repvideo

# name -> (pixel frames x height x width, latent frames fed, expected family, token grid), written out
# by hand from the VAE's compression and the patch size; the configs are crepa.plan.published's.
EXPECTED = {
    "CogVideoX-5B": ((49, 480, 720), 13, "cogvideox", (13, 30, 45)),
    # 81 frames -> 21 latent frames; the pipeline pads one in front (22) for the temporal patch of 2
    "CogVideoX1.5-5B": ((81, 768, 1360), 22, "cogvideox", (11, 48, 85)),
    "CogVideoX-5B-I2V": ((49, 480, 720), 13, "cogvideox_i2v", (13, 30, 45)),
    "HunyuanVideo": ((129, 720, 1280), 33, "hunyuanvideo", (33, 45, 80)),
    "Wan2.1-T2V-14B": ((81, 480, 832), 21, "wan", (21, 30, 52)),
    "Wan2.1-T2V-1.3B": ((81, 480, 832), 21, "wan", (21, 30, 52)),
    "Wan2.1-I2V-14B-480P": ((81, 480, 832), 21, "wan_i2v", (21, 30, 52)),
    # the 48-channel 4 x 16 VAE: 121 frames -> 31 latent frames, 704 x 1280 -> 44 x 80 latents
    "Wan2.2-TI2V-5B": ((121, 704, 1280), 31, "wan2_2_ti2v", (31, 22, 40)),
    "SkyReels-V2-T2V-14B-540P": ((97, 544, 960), 25, "skyreels_v2", (25, 34, 60)),
    "LTX-Video": ((161, 512, 768), 21, "ltx_video", (21, 16, 24)),
    "Mochi-1": ((85, 480, 848), 15, "mochi", (15, 30, 53)),
    "Cosmos-1.0-Diffusion-7B-Text2World": ((121, 704, 1280), 16, "cosmos", (16, 44, 80)),
    # non-causal VAE: 88 frames -> 22 latent frames
    "Allegro": ((88, 720, 1280), 22, "allegro", (22, 45, 80)),
}
REAL = {
    name: (PUBLISHED[name].class_name, PUBLISHED[name].config, *expected)
    for name, expected in EXPECTED.items()
}


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
    text_dim = text_width(config)
    text_length = config.get("max_text_seq_length", 64)
    with torch.device("meta"):
        channels = transformer.config.out_channels or transformer.config.in_channels
        latents = torch.empty(
            1, channels, latent_frames, height // family.spatial_ratio, width // family.spatial_ratio
        )
        text = {
            "prompt_embeds": torch.empty(1, text_length, text_dim),
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


def test_published_shapes_are_the_ones_written_here() -> None:
    assert {name: PUBLISHED[name].shape for name in EXPECTED} == {
        name: expected[0] for name, expected in EXPECTED.items()
    }
