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
from crepa.models.published import PUBLISHED as REAL
from crepa.models.registry import detect_family
from crepa.models.tiny import TEXT_WIDTH_KEYS
from crepa.repvideo import install_repvideo


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
