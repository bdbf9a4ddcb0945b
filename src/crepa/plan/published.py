"""Published transformer configs of the supported checkpoints, so that ``crepa plan`` works offline.

Each entry is the ``transformer/config.json`` of a hub checkpoint (values typed in from it) and the
clip shape the model was published for (pixel frames, height, width). The memory planner builds
the transformer from it on the meta device; ``tests/models/test_real_configs.py`` runs each one
forward; ``benchmarks/bench_real_step.py`` trains a LoRA step of one with random weights on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PublishedModel:
    """name: the checkpoint line; repo: its hub id; class_name: the diffusers transformer class;
    config: its transformer config; shape: (frames, height, width) of the clips it was published for."""

    name: str
    repo: str
    class_name: str
    config: dict[str, Any]
    shape: tuple[int, int, int]


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

PUBLISHED: dict[str, PublishedModel] = {
    model.name: model
    for model in (
        PublishedModel(
            "CogVideoX-5B",
            "THUDM/CogVideoX-5b",
            "CogVideoXTransformer3DModel",
            _COGVIDEOX_5B,
            (49, 480, 720),
        ),
        PublishedModel(
            "CogVideoX1.5-5B",
            "THUDM/CogVideoX1.5-5B",
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
        ),
        PublishedModel(
            "CogVideoX-5B-I2V",
            "THUDM/CogVideoX-5b-I2V",
            "CogVideoXTransformer3DModel",
            {**_COGVIDEOX_5B, "in_channels": 32, "use_learned_positional_embeddings": True},
            (49, 480, 720),
        ),
        PublishedModel(
            "HunyuanVideo",
            "hunyuanvideo-community/HunyuanVideo",
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
        ),
        PublishedModel(
            "Wan2.1-T2V-14B",
            "Wan-AI/Wan2.1-T2V-14B-Diffusers",
            "WanTransformer3DModel",
            _WAN_14B,
            (81, 480, 832),
        ),
        PublishedModel(
            "Wan2.1-T2V-1.3B",
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            "WanTransformer3DModel",
            {**_WAN_14B, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
            (81, 480, 832),
        ),
        PublishedModel(
            "Wan2.1-I2V-14B-480P",
            "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
            "WanTransformer3DModel",
            {**_WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
            (81, 480, 832),
        ),
        # Checked against the Wan team's own ti2v_5B config: dim 3072 (24 heads of 128), ffn_dim 14336,
        # 30 layers, in_dim 48, VAE stride (4, 16, 16); the rest as Wan 2.1.
        PublishedModel(
            "Wan2.2-TI2V-5B",
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            "WanTransformer3DModel",
            {
                **_WAN_14B,
                "num_attention_heads": 24,
                "ffn_dim": 14336,
                "num_layers": 30,
                "in_channels": 48,
                "out_channels": 48,
            },
            (121, 704, 1280),
        ),
        PublishedModel(
            "SkyReels-V2-T2V-14B-540P",
            "Skywork/SkyReels-V2-T2V-14B-540P-Diffusers",
            "SkyReelsV2Transformer3DModel",
            _WAN_14B,
            (97, 544, 960),
        ),
        PublishedModel(
            "LTX-Video",
            "Lightricks/LTX-Video",
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
        ),
        PublishedModel(
            "Mochi-1",
            "genmo/mochi-1-preview",
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
        ),
        PublishedModel(
            "Cosmos-1.0-Diffusion-7B-Text2World",
            "nvidia/Cosmos-1.0-Diffusion-7B-Text2World",
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
        ),
        PublishedModel(
            "Allegro",
            "rhymes-ai/Allegro",
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
        ),
    )
}


def published_by_repo(repo: str) -> PublishedModel | None:
    """The entry whose hub id is ``repo`` (case-insensitive), None if crepa does not know it."""
    return next((model for model in PUBLISHED.values() if model.repo.lower() == repo.lower()), None)
