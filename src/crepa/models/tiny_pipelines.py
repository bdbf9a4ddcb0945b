"""Tiny, randomly initialised but complete diffusers pipelines, saved to a directory.

Each holds a transformer, a VAE of the family's class with the family's real compression ratios,
text encoder(s), a word-level tokenizer built locally (nothing comes from a hub) and the scheduler,
written with ``pipeline.save_pretrained`` so that loading goes through the real ``from_pretrained``
code. Sizes follow diffusers' own pipeline tests; every model builds and runs in milliseconds on a
CPU. The tests, the benchmarks and the demo use them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from crepa.logs import without_log_messages
from crepa.models.registry import family_of
from crepa.models.tiny import TINY_MODELS, tiny_transformer

# Words the tiny tokenizer knows; any other word becomes <unk>. Lower-cased, split on whitespace
# and punctuation.
_WORDS = """
a an the of and or with in on at to from by for over under near behind through into while
is are was were be being has have it its this that these those there here one two three
man woman person people child dog cat bird horse fish car bus train boat plane ball tree
flower grass field forest river lake sea ocean beach mountain hill road street city house room
window door table chair sky cloud sun moon star rain snow fire water light shadow wind smoke
red green blue yellow white black orange purple pink brown gray bright dark small large big
tall long short slow fast quiet loud warm cold old young new happy calm moving still
walks runs jumps flies swims drives rolls spins turns falls rises sits stands looks smiles
dances plays waves flows shines glows moves rotates slides bounces crosses climbs
camera shot view close wide aerial pan zoom tracking scene video clip frame motion detail
left right up down forward backward around across along slowly quickly gently smoothly
square circle line stripe dot pattern texture background foreground centre center top bottom
describe detailing following aspects main content objects actions spatial relationships
"""
_SPECIAL = ("<pad>", "</s>", "<unk>", "<s>")


def build_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (ids: 0 pad, 1 eos, 2 unk, 3 bos, then words) that appends </s>."""
    vocab = {token: index for index, token in enumerate([*_SPECIAL, *dict.fromkeys(_WORDS.split())])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=max_length,
    )


VOCAB_SIZE = 256  # >= len(_SPECIAL) + number of distinct words
PAD_ID, EOS_ID = 0, 1


def _t5_config(config_class: type[T5Config] | type[UMT5Config]) -> T5Config | UMT5Config:
    return config_class(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )


def _cogvideox() -> dict[str, Any]:
    # the tiny CogVideoX of the unit tests, with T5's 32-d states and a 9-frame, 2x2 sample grid
    transformer = tiny_transformer(
        "cogvideox",
        num_attention_heads=4,
        text_embed_dim=32,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        max_text_seq_length=16,
    )
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = diffusers.CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=T5EncoderModel(_t5_config(T5Config)),
        tokenizer=build_tokenizer(226),
    )


def _wan() -> dict[str, Any]:
    # the tiny Wan transformer of the unit tests, widened to the tiny VAE's 16 channels and T5's 32
    transformer = tiny_transformer("wan", in_channels=16, out_channels=16, text_dim=32)
    # z_dim 16 keeps the default per-channel latents_mean / latents_std of the real Wan VAE.
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return dict(
        transformer=transformer,
        transformer_2=None,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=UMT5EncoderModel(_t5_config(UMT5Config)),
        tokenizer=build_tokenizer(512),
    )


def _rebuilt(model: torch.nn.Module, **changes: Any) -> torch.nn.Module:
    """A new model of ``model``'s class from its config with ``changes`` (private keys such as
    ``_use_default_values`` dropped: from_config would reset those entries to the class defaults)."""
    config = {key: value for key, value in model.config.items() if not key.startswith("_")}
    return type(model).from_config({**config, **changes})


def _cogvideox_i2v() -> dict[str, Any]:
    """CogVideoX-5B-I2V in small: the transformer reads [latents, image latents] (2 x 16 channels)."""
    components = _cogvideox()
    torch.manual_seed(0)
    components["transformer"] = _rebuilt(components["transformer"], in_channels=32, out_channels=16)
    components["vae"] = _rebuilt(components["vae"], latent_channels=16)
    return components


def _cogvideox_1_5() -> dict[str, Any]:
    """CogVideoX 1.5 in small: 2 latent frames per token and 3-D RoPE sliced from the sample grid."""
    components = _cogvideox()
    torch.manual_seed(0)
    changes = {**TINY_MODELS["cogvideox_1_5"].config, "text_embed_dim": 32, "max_text_seq_length": 16}
    components["transformer"] = _rebuilt(components["transformer"], **changes)
    return components


def _wan_i2v() -> dict[str, Any]:
    """Wan 2.1 I2V in small: 16 latent + 4 mask + 16 condition channels in, CLIP image states beside the text."""
    components = _wan()
    wan = TINY_MODELS["wan"].config
    components["transformer"] = tiny_transformer(
        "wan",
        in_channels=36,
        out_channels=16,
        text_dim=32,
        image_dim=32,
        added_kv_proj_dim=wan["num_attention_heads"] * wan["attention_head_dim"],
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    components["image_encoder"] = CLIPVisionModel(vision)
    # Without torchvision, transformers 5 resolves CLIPImageProcessor to its PIL class and warns that
    # it does: the PIL class serves these 32-pixel images, and the warning was the first line of the demo.
    with without_log_messages(
        "transformers.utils.import_utils", lambda message: message.startswith("`CLIPImageProcessor` requires")
    ):
        processor_class = transformers.CLIPImageProcessor
    components["image_processor"] = processor_class(crop_size=32, size={"shortest_edge": 32})
    return components


def _wan_a14b() -> dict[str, Any]:
    """Wan 2.2 A14B in small: a high-noise ``transformer`` and a low-noise ``transformer_2`` (other
    weights), switched at the pipeline's boundary_ratio (0.875 for T2V A14B)."""
    components = _wan()
    torch.manual_seed(1)
    components["transformer_2"] = _rebuilt(components["transformer"])
    return {**components, "boundary_ratio": 0.875}


def _wan_i2v_a14b() -> dict[str, Any]:
    """Wan 2.2 I2V A14B in small: two I2V experts (36 input channels, no CLIP image states) switched at
    boundary_ratio 0.9, no image encoder."""
    components = {key: value for key, value in _wan_i2v().items() if not key.startswith("image_")}
    torch.manual_seed(0)
    components["transformer"] = _rebuilt(components["transformer"], image_dim=None, added_kv_proj_dim=None)
    torch.manual_seed(1)
    components["transformer_2"] = _rebuilt(components["transformer"])
    return {**components, "boundary_ratio": 0.9}


def _wan2_2_ti2v() -> dict[str, Any]:
    """Wan 2.2 TI2V-5B in small: its VAE's 2x2 pixel patching, residual blocks, 48 latent channels and
    16x spatial compression; the pipeline expands the timestep per token (all equal in text-to-video)."""
    components = _wan()
    del components["transformer_2"]
    components["transformer"] = tiny_transformer("wan2_2_ti2v", text_dim=32)
    components["vae"] = diffusers.AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=torch.linspace(-0.5, 0.5, 48).tolist(),  # non-trivial, as in the released VAE
        latents_std=torch.linspace(0.5, 2.0, 48).tolist(),
    )
    return {**components, "expand_timesteps": True}


def _skyreels_v2() -> dict[str, Any]:
    """SkyReels-V2 text-to-video in small: the tiny Wan parts around a SkyReels-V2 transformer."""
    components = _wan()
    del components["transformer_2"]
    torch.manual_seed(0)
    transformer = components["transformer"]
    components["transformer"] = diffusers.SkyReelsV2Transformer3DModel.from_config(
        {key: value for key, value in transformer.config.items() if not key.startswith("_")}
    )
    components["scheduler"] = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
    )
    return components


def _mochi() -> dict[str, Any]:
    """Mochi 1 in small: the real 6x temporal, 8x spatial compression and 12 latent channels."""
    transformer = tiny_transformer("mochi", in_channels=12, text_embed_dim=32)
    vae = diffusers.AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),  # its group norms have 32 groups
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        add_attention_block=(False, False, False, False, False),
    )
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        text_encoder=T5EncoderModel(_t5_config(T5Config)),
        tokenizer=build_tokenizer(256),
    )


def _hunyuanvideo() -> dict[str, Any]:
    # the tiny HunyuanVideo of the unit tests with two blocks of each kind and diffusers' patch 1
    transformer = tiny_transformer("hunyuanvideo", num_layers=2, num_single_layers=2, patch_size=1)
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    llama = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,  # the pipeline reads the hidden states 2 layers before the last
        pad_token_id=PAD_ID,
        bos_token_id=3,
        eos_token_id=EOS_ID,
        hidden_act="gelu",
    )
    clip = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=8,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=PAD_ID,
        bos_token_id=3,
        eos_token_id=EOS_ID,
        hidden_act="gelu",
        projection_dim=32,
    )
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=LlamaModel(llama),
        tokenizer=build_tokenizer(256),
        text_encoder_2=CLIPTextModel(clip),
        tokenizer_2=build_tokenizer(77),
    )


def _ltx_video() -> dict[str, Any]:
    # the tiny LTX-Video of the unit tests, widened to the tiny VAE's 8 channels and T5's 32-d states
    transformer = tiny_transformer(
        "ltx_video",
        in_channels=8,
        out_channels=8,
        num_attention_heads=4,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    # patch 4 and three spatio-temporal downsamplings: the real 32x spatial, 8x temporal compression.
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    # Non-trivial latent statistics, as in the released checkpoints (the defaults are 0 and 1).
    vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
    vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        text_encoder=T5EncoderModel(_t5_config(T5Config)),
        tokenizer=build_tokenizer(128),
    )


TINY_PIPELINES: dict[str, Callable[[], dict[str, Any]]] = {
    "cogvideox": _cogvideox,
    "cogvideox_1_5": _cogvideox_1_5,
    "cogvideox_i2v": _cogvideox_i2v,
    "wan": _wan,
    "wan_i2v": _wan_i2v,
    "wan_a14b": _wan_a14b,
    "skyreels_v2": _skyreels_v2,
    "wan2_2_ti2v": _wan2_2_ti2v,
    "wan_i2v_a14b": _wan_i2v_a14b,
    "mochi": _mochi,
    "hunyuanvideo": _hunyuanvideo,
    "ltx_video": _ltx_video,
}


def save_tiny_pipeline(family: str, directory: str | Path) -> Path:
    """Build the tiny pipeline ``family`` (a key of :data:`TINY_PIPELINES`, weights fixed by seed 0) and
    save it to ``directory`` with its registry family's pipeline class."""
    if family not in TINY_PIPELINES:
        raise ValueError(f"no tiny pipeline for {family!r}; available: {', '.join(TINY_PIPELINES)}")
    components = TINY_PIPELINES[family]()
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    transformer = components["transformer"]
    pipeline_class = getattr(
        diffusers, family_of(type(transformer).__name__, transformer.config).pipeline_class
    )
    pipeline = pipeline_class(**components)
    directory = Path(directory)
    pipeline.save_pretrained(directory)
    return directory
