"""The non-transformer parts of a family's diffusers pipeline: VAE, text encoder(s), tokenizer(s), scheduler.

Loaded by hub id or local directory through the pipeline class's own ``from_pretrained`` with
``transformer=None``, so prompts are encoded by the pipeline's own ``encode_prompt`` (its
tokenizer settings, templates and padding) and nothing of the transformer but its config is read.
What differs between families is data: :data:`PROMPT_ENCODINGS` (keyed by family name) and
:data:`LATENT_NORMALIZATIONS` (keyed by VAE class, i.e. ``ModelFamily.vae_class``).

Latents are kept in the VAE's layout (B, C, F, H, W); callers permute for transformers that
want another layout (``ModelFamily.layout``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import diffusers
import torch
from packaging.version import Version
from torch import nn

from crepa.logs import without_log_messages
from crepa.models.registry import FAMILIES, ModelFamily, family_of, get_family

# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype (the old name warns).
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def own_components_accepted() -> AbstractContextManager[None]:
    """While the block runs (a pipeline's ``from_pretrained``), diffusers does not warn "Expected types
    for vae: (<class 'diffusers...'>,), got <class 'crepa....'>": a component class of crepa's own (the
    demo's VAE, :mod:`crepa.demo.latent`) is meant to stand in for the class the pipeline names. Any
    other type mismatch is still reported."""
    return without_log_messages(
        "diffusers.pipelines.pipeline_utils",
        lambda message: message.startswith("Expected types for ") and ", got <class 'crepa." in message,
    )


@dataclass(frozen=True)
class PromptEncoding:
    """How one family's ``pipeline.encode_prompt`` is called and what it returns.

    outputs: names given to the returned tuple's items, in order (None: ignored, e.g. negatives).
    options: extra keyword arguments (e.g. no classifier-free guidance, so no negative prompt).
    max_sequence_length: the pipeline's default text length; ``length_config_key`` names a
    transformer config entry that fixes it instead (CogVideoX's positional embeddings).
    """

    outputs: tuple[str | None, ...]
    max_sequence_length: int
    options: Mapping[str, Any] = field(default_factory=dict)
    length_config_key: str | None = None


_NO_CFG = {"do_classifier_free_guidance": False}

PROMPT_ENCODINGS: dict[str, PromptEncoding] = {
    "cogvideox": PromptEncoding(("prompt_embeds", None), 226, _NO_CFG, "max_text_seq_length"),
    "cogvideox_i2v": PromptEncoding(("prompt_embeds", None), 226, _NO_CFG, "max_text_seq_length"),
    "wan": PromptEncoding(("prompt_embeds", None), 512, _NO_CFG),
    "wan_i2v": PromptEncoding(("prompt_embeds", None), 512, _NO_CFG),
    "wan2_2_ti2v": PromptEncoding(("prompt_embeds", None), 512, _NO_CFG),
    "skyreels_v2": PromptEncoding(("prompt_embeds", None), 512, _NO_CFG),
    "hunyuanvideo": PromptEncoding(("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"), 256),
    "ltx_video": PromptEncoding(("prompt_embeds", "prompt_attention_mask", None, None), 128, _NO_CFG),
    "mochi": PromptEncoding(("prompt_embeds", "prompt_attention_mask", None, None), 256, _NO_CFG),
    "allegro": PromptEncoding(("prompt_embeds", "prompt_attention_mask", None, None), 512, _NO_CFG),
}


@dataclass(frozen=True)
class LatentNormalization:
    """normalised = (z - mean) * scale / std, as the family's pipeline undoes it before decoding.

    stats: where the per-channel mean / std live: "none" (0 and 1), "config"
    (``vae.config.latents_mean`` / ``latents_std``) or "buffers" (``vae.latents_mean`` / ``latents_std``).
    scaled: whether ``vae.config.scaling_factor`` is the scale (else 1).
    """

    stats: Literal["none", "config", "buffers"]
    scaled: bool


LATENT_NORMALIZATIONS: dict[str, LatentNormalization] = {
    "AutoencoderKLCogVideoX": LatentNormalization("none", scaled=True),
    "AutoencoderKLHunyuanVideo": LatentNormalization("none", scaled=True),
    "AutoencoderKLAllegro": LatentNormalization("none", scaled=True),
    "AutoencoderKLWan": LatentNormalization("config", scaled=False),
    "AutoencoderKLMochi": LatentNormalization("config", scaled=True),
    "AutoencoderKLLTXVideo": LatentNormalization("buffers", scaled=True),
    "PCAVideoAutoencoder": LatentNormalization("none", scaled=True),  # the demo's VAE (crepa.demo.latent)
}


@dataclass
class PipelineComponents:
    """A family's pipeline without its transformer, plus the transformer's config (no weights).

    ``pipeline`` holds ``vae``, ``text_encoder`` (and ``text_encoder_2``), tokenizers and scheduler.
    """

    family: ModelFamily
    source: str
    revision: str | None
    pipeline: Any
    transformer_config: dict[str, Any]

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def patch_sizes(self) -> tuple[int, int, int]:
        """(t, h, w) patch size of the transformer."""
        return patch_sizes_from_config(self.family, self.transformer_config)

    @property
    def max_sequence_length(self) -> int:
        """Text length the prompt embeddings are padded / truncated to."""
        return text_length(self.family, self.transformer_config)


def text_length(family: ModelFamily, transformer_config: Mapping[str, Any]) -> int:
    """The family's prompt length, or the one its transformer config fixes (CogVideoX)."""
    encoding = _prompt_encoding(family)
    key = encoding.length_config_key
    if key is not None and transformer_config.get(key):
        return int(transformer_config[key])
    return encoding.max_sequence_length


def read_transformer_config(
    source: str | Path, family: ModelFamily, revision: str | None = None
) -> dict[str, Any]:
    """The transformer's ``config.json`` (no weights are read)."""
    transformer_class = getattr(diffusers, family.class_names[0])
    return dict(transformer_class.load_config(str(source), subfolder="transformer", revision=revision))


def patch_sizes_from_config(family: ModelFamily, config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(t, h, w) patch size from a transformer config, as ``family.patch_sizes`` reads it from a model."""
    return family.patch_sizes(SimpleNamespace(config=SimpleNamespace(**config)))  # type: ignore[arg-type]


def student_grid(
    family: ModelFamily, patch_sizes: tuple[int, int, int], num_frames: int, height: int, width: int
) -> tuple[int, int, int]:
    """(F', H', W') for a clip of ``num_frames`` x ``height`` x ``width`` pixels.

    F' counts latent frames (1 + (T - 1) / r for causal VAEs, T / r otherwise; a temporal patch is
    matched by the regularizer); H', W' are latent rows / columns over the spatial patch size.
    """
    ratio_t, ratio_s = family.temporal_ratio, family.spatial_ratio
    frames = 1 + (num_frames - 1) // ratio_t if family.causal_vae else num_frames // ratio_t
    return frames, height // ratio_s // patch_sizes[1], width // ratio_s // patch_sizes[2]


def _prompt_encoding(family: ModelFamily) -> PromptEncoding:
    if family.name not in PROMPT_ENCODINGS:
        raise ValueError(
            f"model family {family.name!r} has no prompt encoding in crepa yet; supported: "
            f"{', '.join(PROMPT_ENCODINGS)}"
        )
    return PROMPT_ENCODINGS[family.name]


def _latent_normalization(vae: nn.Module) -> LatentNormalization:
    name = type(vae).__name__
    if name not in LATENT_NORMALIZATIONS:
        raise ValueError(
            f"crepa does not know the latent normalisation of {name}; known: {', '.join(LATENT_NORMALIZATIONS)}"
        )
    return LATENT_NORMALIZATIONS[name]


def pipeline_family(source: str | Path, revision: str | None = None) -> ModelFamily:
    """The registry entry of the pipeline at ``source``: its ``model_index.json`` transformer class,
    told apart by the transformer config where families share a class (``ModelFamily.config_match``)."""
    index = diffusers.DiffusionPipeline.load_config(str(source), revision=revision)
    class_name = (index.get("transformer") or [None, None])[1]
    candidates = [family for family in FAMILIES.values() if class_name in family.class_names]
    if not candidates:
        raise ValueError(
            f"{source}: model_index.json names transformer class {class_name!r}, which crepa does not "
            f"support; set model.family to one of {', '.join(FAMILIES)} if the class was renamed"
        )
    return family_of(class_name, read_transformer_config(source, candidates[0], revision))


def resolve_family(source: str | Path, family: str | None = None, revision: str | None = None) -> ModelFamily:
    """The registry entry named ``family`` (``model.family``), else the one detected from ``source``."""
    return get_family(family) if family else pipeline_family(source, revision)


def load_components(
    source: str | Path,
    family: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    vae: bool = True,
    text_encoders: bool = True,
) -> PipelineComponents:
    """Load VAE, text encoder(s), tokenizer(s) and scheduler of the pipeline at ``source``.

    ``vae=False`` / ``text_encoders=False`` skip those components. The transformer is never
    loaded; its config is. Models are put in eval mode, frozen, on ``device`` in ``dtype``.
    """
    entry = resolve_family(source, family, revision)
    pipeline_class = getattr(diffusers, entry.pipeline_class)
    parameters = inspect.signature(pipeline_class.__init__).parameters
    skipped = {name: None for name in ("transformer", "transformer_2") if name in parameters}
    if not vae:
        skipped["vae"] = None
    if not text_encoders:
        skipped |= {name: None for name in parameters if name.startswith(("text_encoder", "tokenizer"))}
    with own_components_accepted():
        pipeline = pipeline_class.from_pretrained(
            str(source), revision=revision, **{_DTYPE_KWARG: dtype}, **skipped
        )
    pipeline.to(device)
    for module in pipeline.components.values():
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
    transformer_config = read_transformer_config(source, entry, revision)
    return PipelineComponents(entry, str(source), revision, pipeline, transformer_config)


@torch.no_grad()
def encode_prompts(components: PipelineComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompt embeddings through the family's own ``encode_prompt``.

    Returns e.g. {"prompt_embeds": (B, L, D)} for CogVideoX / Wan, plus "prompt_attention_mask"
    (B, L) for LTX-Video, plus "pooled_prompt_embeds" (B, D2) for HunyuanVideo. Keys are the
    diffusers argument names.
    """
    encoding = _prompt_encoding(components.family)
    pipeline = components.pipeline
    if getattr(pipeline, "text_encoder", None) is None:
        raise ValueError(
            f"{components.source}: text encoders were not loaded (load_components(text_encoders=True))"
        )
    outputs = pipeline.encode_prompt(
        prompt=list(prompts),
        max_sequence_length=components.max_sequence_length,
        device=pipeline.text_encoder.device,
        **encoding.options,
    )
    return {name: tensor for name, tensor in zip(encoding.outputs, outputs, strict=True) if name is not None}


def _latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, std) shaped (1, C, 1, 1, 1) and the scale, for latents ``like`` (B, C, F, H, W)."""
    rule = _latent_normalization(vae)
    channels = like.shape[1]
    if rule.stats == "config":
        mean = torch.tensor(vae.config.latents_mean)
        std = torch.tensor(vae.config.latents_std)
    elif rule.stats == "buffers":
        mean, std = vae.latents_mean, vae.latents_std
    else:
        mean, std = torch.zeros(channels), torch.ones(channels)
    scale = float(vae.config.scaling_factor) if rule.scaled else 1.0
    view = (1, channels, 1, 1, 1)
    return mean.view(view).to(like), std.view(view).to(like), scale


@torch.no_grad()
def encode_latents(vae: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Clean frames (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, F, H/s, W/s).

    Takes the mode (mean) of the latent distribution, so the result is deterministic, and applies
    the family's normalisation (scaling factor and / or per-channel mean and std).
    """
    parameter = next(vae.parameters())
    posterior = vae.encode(frames.to(parameter.device, parameter.dtype)).latent_dist
    latents = posterior.mode()
    mean, std, scale = _latent_stats(vae, latents)
    return (latents - mean) * scale / std


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_latents`: normalised latents (B, C, F, h, w) -> frames (B, 3, T, H, W) in [-1, 1]."""
    parameter = next(vae.parameters())
    latents = latents.to(parameter.device, parameter.dtype)
    mean, std, scale = _latent_stats(vae, latents)
    raw = latents * std / scale + mean
    options: dict[str, Any] = {}
    if getattr(vae.config, "timestep_conditioning", False):
        options["temb"] = torch.zeros(raw.shape[0], device=raw.device, dtype=raw.dtype)  # clean latents
    return vae.decode(raw, **options).sample.clamp(-1, 1)


def expert_noise_range(
    source: str | Path, expert: str | None, revision: str | None = None
) -> tuple[float, float]:
    """Noise levels s in [lo, hi] the pipeline gives ``expert`` (``model.expert``): Wan 2.2 A14B runs
    ``transformer`` at timesteps >= boundary_ratio * 1000, i.e. s >= boundary_ratio, and
    ``transformer_2`` below; (0, 1) for single-transformer pipelines."""
    if expert is None:
        return 0.0, 1.0
    index = diffusers.DiffusionPipeline.load_config(str(source), revision=revision)
    boundary = index.get("boundary_ratio")
    if boundary is None:
        raise ValueError(f"{source}: model_index.json has no boundary_ratio between its two experts")
    return (float(boundary), 1.0) if expert == "transformer" else (0.0, float(boundary))
