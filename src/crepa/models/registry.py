"""Supported video transformer families, as data: one :class:`ModelFamily` entry per family.

Nothing else in crepa branches on the model class; code asks the registry for the block list,
the latent grid of a forward call, the latent layout, the VAE compression, the default block and
the objective. Facts are those of diffusers 0.42 (transformers, pipelines, default schedulers).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

Layout = Literal["BCFHW", "BFCHW", "packed"]
Objective = Literal["flow_matching", "flow_matching_reversed", "v_prediction", "epsilon", "edm"]
"""Training objectives, with s the noise level in [0, 1] and x_s = (1 - s) x0 + s noise for flow matching.

- "flow_matching": timestep = timestep_scale * s, target = noise - x0.
- "flow_matching_reversed" (Mochi; its scheduler has invert_sigmas): timestep = timestep_scale * (1 - s),
  target = x0 - noise.
- "v_prediction" / "epsilon": DDPM schedules with integer timesteps 0..999, target v or noise.
- "edm" (Cosmos 1.0, EDMEulerScheduler): EDM preconditioning (c_in, c_noise = log(sigma) / 4, c_skip, c_out).
"""


@dataclass(frozen=True)
class ModelFamily:
    """What crepa needs to know about one family of diffusers video transformers.

    class_names: transformer classes of the family. Families sharing a class are told apart by
    ``config_match``: (key, value) pairs of the transformer config that must all hold (empty = any
    config); the most specific matching entry wins.
    block_lists: attribute names of the block ``nn.ModuleList``s, in execution order; one global
    block index runs through them.
    layout: how the forward's ``hidden_states`` carries the latents (B, C, F, H, W): "BCFHW",
    "BFCHW", or "packed" (B, F*H*W, C*p_t*p*p) with ``num_frames`` / ``height`` / ``width`` (latent
    sizes) passed alongside.
    temporal_ratio, spatial_ratio: the VAE's compression (the latent width is the transformer's:
    :func:`latent_channels`).
    causal_vae: True when 1 + r*m pixel frames give 1 + m latent frames (latent 0 = pixel frame 0);
    False when T frames give T / r latent frames (latent f = pixel frames r*f .. r*f + r - 1).
    objective, timestep_scale: the training objective (see :data:`Objective`).
    lora_target_regex: peft ``target_modules`` regex (full match) selecting the attention
    projections inside the block lists.
    rotary_table_key: the transformer config key holding the length of its precomputed rotary
    position table, the most tokens it can place along each axis (latent frames, rows, columns);
    None when positions are computed for any size.
    """

    name: str
    class_names: tuple[str, ...]
    block_lists: tuple[str, ...]
    layout: Layout
    temporal_ratio: int
    spatial_ratio: int
    default_block_index: int
    objective: Objective
    pipeline_class: str
    vae_class: str
    lora_target_regex: str
    causal_vae: bool = True
    timestep_scale: float = 1000.0
    config_match: tuple[tuple[str, Any], ...] = ()
    rotary_table_key: str | None = None

    def matches(self, class_name: str, config: Mapping[str, Any]) -> bool:
        """Whether a transformer of class ``class_name`` with ``config`` belongs to this family."""
        return class_name in self.class_names and all(
            config.get(key) == value for key, value in self.config_match
        )

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """All transformer blocks in execution order (global block index = position in this list)."""
        return [block for attr in self.block_lists for block in getattr(transformer, attr)]

    def hidden_size(self, transformer: nn.Module) -> int:
        """Width C of the block outputs."""
        config = transformer.config
        return int(config.num_attention_heads * config.attention_head_dim)

    def patch_sizes(self, transformer: nn.Module) -> tuple[int, int, int]:
        """(t, h, w) patch size: latent frames, rows and columns per token."""
        config = transformer.config
        patch = config.patch_size
        if isinstance(patch, (tuple, list)):
            return int(patch[0]), int(patch[1]), int(patch[2])
        patch_t = getattr(config, "patch_size_t", None) or 1
        return int(patch_t), int(patch), int(patch)

    def max_tokens_per_axis(self, transformer: nn.Module) -> int | None:
        """Most tokens along any one axis the transformer's rotary table covers; None: no limit."""
        if self.rotary_table_key is None:
            return None
        return int(getattr(transformer.config, self.rotary_table_key))

    def latent_grid(self, transformer: nn.Module, call: Mapping[str, Any]) -> tuple[int, int, int]:
        """(F', H', W') token grid of a forward call, from its bound arguments ``call``."""
        hidden = call["hidden_states"]
        if self.layout == "packed":
            missing = [key for key in ("num_frames", "height", "width") if call.get(key) is None]
            if missing:
                raise ValueError(
                    f"{type(transformer).__name__} was called without {', '.join(missing)}: crepa reads "
                    "the token grid from num_frames / height / width (latent sizes); pass them with the "
                    "packed hidden_states (they may go along with video_coords)"
                )
            sizes = tuple(int(call[key]) for key in ("num_frames", "height", "width"))
        elif self.layout == "BFCHW":
            sizes = (hidden.shape[1], hidden.shape[3], hidden.shape[4])
        else:
            sizes = (hidden.shape[2], hidden.shape[3], hidden.shape[4])
        patches = self.patch_sizes(transformer)
        for axis, size, patch in zip(("latent frames", "height", "width"), sizes, patches, strict=True):
            if size % patch:
                raise ValueError(
                    f"{type(transformer).__name__} patches {patch} along {axis}, but the latents have "
                    f"{size}: use a multiple of {patch} (pad or crop the latents)"
                )
        frames, height, width = (size // patch for size, patch in zip(sizes, patches, strict=True))
        return frames, height, width

    def latent_kwargs(self, transformer: nn.Module, latents: torch.Tensor) -> dict[str, Any]:
        """The forward kwargs carrying ``latents`` (B, C, F, H, W) in this family's layout.

        Packed layouts follow the pipeline's packing: tokens frame-major, then rows, then columns,
        each token's features ordered (C, p_t, p, p); num_frames / height / width are latent sizes.
        """
        if self.layout == "BCFHW":
            return {"hidden_states": latents}
        if self.layout == "BFCHW":
            return {"hidden_states": latents.transpose(1, 2)}
        batch, channels, frames, height, width = latents.shape
        patch_t, patch_h, patch_w = self.patch_sizes(transformer)
        tokens = latents.reshape(
            batch, channels, frames // patch_t, patch_t, height // patch_h, patch_h, width // patch_w, patch_w
        )
        tokens = tokens.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)
        return {"hidden_states": tokens, "num_frames": frames, "height": height, "width": width}


def _anchored(*lists: str) -> str:
    """Attention projections (to_q, to_k, to_v, to_out.0) of the blocks in ``lists``, nothing else."""
    return rf"^({'|'.join(lists)})\.\d+\.attn\d?\.(to_q|to_k|to_v|to_out\.0)$"


def _family(
    name: str,
    class_name: str,
    pipeline_class: str,
    vae_class: str,
    block_lists: tuple[str, ...] = ("transformer_blocks",),
    **fields: Any,
) -> ModelFamily:
    """A row from the common case, ``fields`` overriding it: latents (B, C, F, H, W) of a causal
    4x8 VAE, block 8 aligned, flow matching, LoRA on the attention projections of the blocks."""
    common: dict[str, Any] = {
        "layout": "BCFHW",
        "temporal_ratio": 4,
        "spatial_ratio": 8,
        "default_block_index": 8,
        "objective": "flow_matching",
        "lora_target_regex": _anchored(*block_lists),
    }
    return ModelFamily(
        name=name,
        class_names=(class_name,),
        block_lists=block_lists,
        pipeline_class=pipeline_class,
        vae_class=vae_class,
        **(common | fields),
    )


def _image_to_video(
    text_to_video: ModelFamily, name: str, pipeline_class: str, in_channels: int
) -> ModelFamily:
    """The image-to-video row of a text-to-video family: the same transformer class, told apart by its
    wider input (the conditioning channels concatenated to the latents), with its own pipeline."""
    return replace(
        text_to_video, name=name, pipeline_class=pipeline_class, config_match=(("in_channels", in_channels),)
    )


# 1.0 (2B: 1920-d x 30, 5B: 3072-d x 42, patch (1, 2, 2)) and 1.5 (patch_size_t=2, so an even number of
# latent frames; the pipeline pads at the front).
_COGVIDEOX = _family(
    "cogvideox",
    "CogVideoXTransformer3DModel",
    "CogVideoXPipeline",
    "AutoencoderKLCogVideoX",
    layout="BFCHW",
    objective="v_prediction",
)
# Wan 2.1 and Wan 2.2 A14B (both experts): the 16-channel 4x8 VAE.
_WAN = _family(
    "wan",
    "WanTransformer3DModel",
    "WanPipeline",
    "AutoencoderKLWan",
    block_lists=("blocks",),
    rotary_table_key="rope_max_seq_len",
)
# Cosmos 1.0 Diffusion (learnable extra positional embedding): EDM, the 8x8x8 Cosmos VAE. Real
# checkpoints concatenate a padding mask, which diffusers resizes with torchvision.
_COSMOS = _family(
    "cosmos",
    "CosmosTransformer3DModel",
    "CosmosTextToWorldPipeline",
    "AutoencoderKLCosmos",
    temporal_ratio=8,
    objective="edm",
    config_match=(("extra_pos_embed_type", "learnable"),),
)

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        _COGVIDEOX,
        # CogVideoX-5B-I2V / 1.5-5B-I2V: the first frame's latents concatenated on the channels
        # (in_channels = 2 x 16), fed as CogVideoXImageToVideoPipeline does.
        _image_to_video(_COGVIDEOX, "cogvideox_i2v", "CogVideoXImageToVideoPipeline", in_channels=32),
        # 20 dual-stream blocks then 40 single-stream blocks (no to_out: their attention output goes
        # through proj_out with the MLP), 3072-d.
        _family(
            "hunyuanvideo",
            "HunyuanVideoTransformer3DModel",
            "HunyuanVideoPipeline",
            "AutoencoderKLHunyuanVideo",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            default_block_index=10,
        ),
        _WAN,
        # Wan 2.1 I2V 14B (480P / 720P) and Wan 2.2 I2V A14B: latents + 4 first-frame mask channels
        # + 16 channels of the encoded [image, black frames] video (in_channels 36); 2.1 also
        # cross-attends to CLIP image states (image_dim 1280).
        _image_to_video(_WAN, "wan_i2v", "WanImageToVideoPipeline", in_channels=36),
        # Wan 2.2 TI2V-5B: same transformer class, its own 48-channel 4x16 VAE.
        replace(
            _WAN,
            name="wan2_2_ti2v",
            spatial_ratio=16,
            config_match=(("out_channels", 48),),
        ),
        replace(
            _WAN,
            name="skyreels_v2",
            class_names=("SkyReelsV2Transformer3DModel",),
            pipeline_class="SkyReelsV2Pipeline",
        ),
        _family(
            "ltx_video",
            "LTXVideoTransformer3DModel",
            "LTXPipeline",
            "AutoencoderKLLTXVideo",
            layout="packed",
            temporal_ratio=8,
            spatial_ratio=32,
        ),
        _family(
            "mochi",
            "MochiTransformer3DModel",
            "MochiPipeline",
            "AutoencoderKLMochi",
            temporal_ratio=6,
            objective="flow_matching_reversed",
        ),
        _COSMOS,
        # Cosmos Predict 2 / 2.5 (no extra positional embedding): rectified flow with the timestep in
        # [0, 1] (the pipeline passes s as (B, 1, F, 1, 1)), the Wan VAE.
        replace(
            _COSMOS,
            name="cosmos_predict2",
            temporal_ratio=4,
            objective="flow_matching",
            timestep_scale=1.0,
            pipeline_class="Cosmos2VideoToWorldPipeline",
            vae_class="AutoencoderKLWan",
            config_match=(("extra_pos_embed_type", None),),
        ),
        # Non-causal VAE (88 frames -> 22 latent frames); trained with DDPM epsilon prediction. The
        # transformer has no PeftAdapterMixin: inject LoRA with peft.inject_adapter_in_model.
        _family(
            "allegro",
            "AllegroTransformer3DModel",
            "AllegroPipeline",
            "AutoencoderKLAllegro",
            causal_vae=False,
            objective="epsilon",
        ),
    )
}


def family_of(class_name: str, config: Mapping[str, Any]) -> ModelFamily:
    """The registry entry of a transformer class and its config (``config.json`` contents).

    Families sharing a class are told apart by their ``config_match``; the most specific wins.
    """
    same_class = [family for family in FAMILIES.values() if class_name in family.class_names]
    if not same_class:
        supported = ", ".join(sorted({name for family in FAMILIES.values() for name in family.class_names}))
        raise ValueError(f"crepa does not support {class_name}; supported transformer classes: {supported}")
    matching = [family for family in same_class if family.matches(class_name, config)]
    if not matching:
        expected = "; ".join(f"{family.name}: {dict(family.config_match)}" for family in same_class)
        raise ValueError(
            f"{class_name}'s config matches no crepa family ({expected}); add a ModelFamily entry for it"
        )
    return max(matching, key=lambda family: len(family.config_match))


def latent_channels(config: Mapping[str, Any]) -> int:
    """Channels C of the latents a transformer (its config) denoises: the ``out_channels`` it predicts,
    ``in_channels`` where that is unset. Not ``in_channels`` alone: image-to-video transformers take the
    conditioning concatenated on the channels (CogVideoX-I2V 32 = 2 x 16)."""
    return int(config.get("out_channels") or config["in_channels"])


def detect_family(transformer: nn.Module) -> ModelFamily:
    """The registry entry of ``transformer`` (peft wrappers are looked through)."""
    base = transformer
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    return family_of(type(base).__name__, getattr(base, "config", {}))


def get_family(name: str) -> ModelFamily:
    """The registry entry called ``name`` (e.g. "wan")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name the arguments of a ``module.forward`` call, however they were passed."""
    return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
