"""Supported video transformer families, as data: one :class:`ModelFamily` entry per family.

Nothing else in crepa branches on the model class; code asks the registry for the block list,
the latent grid of a forward call, the VAE compression, the default block and the objective.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

Layout = Literal["BCFHW", "BFCHW", "packed"]
Objective = Literal["flow_matching", "v_prediction"]


@dataclass(frozen=True)
class ModelFamily:
    """What crepa needs to know about one family of diffusers video transformers.

    layout: how the transformer's ``hidden_states`` input is laid out: "BCFHW", "BFCHW", or
    "packed" (B, F*H*W, C) with ``num_frames`` / ``height`` / ``width`` passed alongside.
    block_lists: attribute names of the block ``nn.ModuleList``s, in execution order; one global
    block index runs through them.
    lora_target_regex: peft ``target_modules`` regex anchored to the block lists (attention projections).
    """

    name: str
    class_names: tuple[str, ...]
    block_lists: tuple[str, ...]
    layout: Layout
    temporal_ratio: int
    spatial_ratio: int
    latent_channels: int
    default_block_index: int
    objective: Objective
    pipeline_class: str
    vae_class: str
    lora_target_regex: str

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """All transformer blocks in execution order (global block index = position in this list)."""
        return [block for attr in self.block_lists for block in getattr(transformer, attr)]

    def hidden_size(self, transformer: nn.Module) -> int:
        """Width C of the block outputs."""
        config = transformer.config
        return int(config.num_attention_heads * config.attention_head_dim)

    def patch_sizes(self, transformer: nn.Module) -> tuple[int, int, int]:
        """(t, h, w) patch size of the transformer's patch embedding."""
        config = transformer.config
        patch = config.patch_size
        if isinstance(patch, (tuple, list)):
            return int(patch[0]), int(patch[1]), int(patch[2])
        patch_t = getattr(config, "patch_size_t", None) or 1
        return int(patch_t), int(patch), int(patch)

    def latent_grid(self, transformer: nn.Module, call: Mapping[str, Any]) -> tuple[int, int, int]:
        """(F', H', W') token grid of a forward call, from its bound arguments ``call``."""
        patch_t, patch_h, patch_w = self.patch_sizes(transformer)
        hidden = call["hidden_states"]
        if self.layout == "packed":
            frames, height, width = (int(call[k]) for k in ("num_frames", "height", "width"))
        elif self.layout == "BFCHW":
            frames, height, width = hidden.shape[1], hidden.shape[3], hidden.shape[4]
        else:
            frames, height, width = hidden.shape[2], hidden.shape[3], hidden.shape[4]
        return frames // patch_t, height // patch_h, width // patch_w


def _anchored(*lists: str) -> str:
    targets = r"(to_q|to_k|to_v|to_out\.0)"
    return rf"^({'|'.join(lists)})\.\d+\.attn\d*\.{targets}$"


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="cogvideox",
            class_names=("CogVideoXTransformer3DModel",),
            block_lists=("transformer_blocks",),
            layout="BFCHW",
            temporal_ratio=4,
            spatial_ratio=8,
            latent_channels=16,
            default_block_index=8,
            objective="v_prediction",
            pipeline_class="CogVideoXPipeline",
            vae_class="AutoencoderKLCogVideoX",
            lora_target_regex=_anchored("transformer_blocks"),
        ),
        ModelFamily(
            name="hunyuanvideo",
            class_names=("HunyuanVideoTransformer3DModel",),
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            layout="BCFHW",
            temporal_ratio=4,
            spatial_ratio=8,
            latent_channels=16,
            default_block_index=10,
            objective="flow_matching",
            pipeline_class="HunyuanVideoPipeline",
            vae_class="AutoencoderKLHunyuanVideo",
            lora_target_regex=_anchored("transformer_blocks", "single_transformer_blocks"),
        ),
        ModelFamily(
            name="wan",
            class_names=("WanTransformer3DModel",),
            block_lists=("blocks",),
            layout="BCFHW",
            temporal_ratio=4,
            spatial_ratio=8,
            latent_channels=16,
            default_block_index=8,
            objective="flow_matching",
            pipeline_class="WanPipeline",
            vae_class="AutoencoderKLWan",
            lora_target_regex=_anchored("blocks"),
        ),
        ModelFamily(
            name="skyreels_v2",
            class_names=("SkyReelsV2Transformer3DModel",),
            block_lists=("blocks",),
            layout="BCFHW",
            temporal_ratio=4,
            spatial_ratio=8,
            latent_channels=16,
            default_block_index=8,
            objective="flow_matching",
            pipeline_class="SkyReelsV2Pipeline",
            vae_class="AutoencoderKLWan",
            lora_target_regex=_anchored("blocks"),
        ),
        ModelFamily(
            name="ltx_video",
            class_names=("LTXVideoTransformer3DModel",),
            block_lists=("transformer_blocks",),
            layout="packed",
            temporal_ratio=8,
            spatial_ratio=32,
            latent_channels=128,
            default_block_index=8,
            objective="flow_matching",
            pipeline_class="LTXPipeline",
            vae_class="AutoencoderKLLTXVideo",
            lora_target_regex=_anchored("transformer_blocks"),
        ),
        ModelFamily(
            name="mochi",
            class_names=("MochiTransformer3DModel",),
            block_lists=("transformer_blocks",),
            layout="BCFHW",
            temporal_ratio=6,
            spatial_ratio=8,
            latent_channels=12,
            default_block_index=8,
            objective="flow_matching",
            pipeline_class="MochiPipeline",
            vae_class="AutoencoderKLMochi",
            lora_target_regex=_anchored("transformer_blocks"),
        ),
        ModelFamily(
            name="cosmos",
            class_names=("CosmosTransformer3DModel",),
            block_lists=("transformer_blocks",),
            layout="BCFHW",
            temporal_ratio=8,
            spatial_ratio=8,
            latent_channels=16,
            default_block_index=8,
            objective="flow_matching",
            pipeline_class="CosmosTextToWorldPipeline",
            vae_class="AutoencoderKLCosmos",
            lora_target_regex=_anchored("transformer_blocks"),
        ),
        ModelFamily(
            name="allegro",
            class_names=("AllegroTransformer3DModel",),
            block_lists=("transformer_blocks",),
            layout="BCFHW",
            temporal_ratio=4,
            spatial_ratio=8,
            latent_channels=4,
            default_block_index=8,
            objective="v_prediction",
            pipeline_class="AllegroPipeline",
            vae_class="AutoencoderKLAllegro",
            lora_target_regex=_anchored("transformer_blocks"),
        ),
    )
}


def detect_family(transformer: nn.Module) -> ModelFamily:
    """The registry entry for ``transformer``'s class (peft wrappers are looked through)."""
    base = transformer
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    class_name = type(base).__name__
    for family in FAMILIES.values():
        if class_name in family.class_names:
            return family
    supported = ", ".join(name for family in FAMILIES.values() for name in family.class_names)
    raise ValueError(f"crepa does not support {class_name}; supported transformer classes: {supported}")


def get_family(name: str) -> ModelFamily:
    """The registry entry called ``name`` (e.g. "wan")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name the arguments of a ``module.forward`` call, however they were passed."""
    return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
