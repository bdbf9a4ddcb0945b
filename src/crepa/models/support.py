"""The support matrix: which published checkpoints crepa trains, as data next to the registry.

One :class:`Variant` per checkpoint line (CogVideoX-5B, Wan 2.1 I2V 14B, ...): its registry family,
task, diffusers pipeline class and either ``tiny`` (the tiny pipeline that runs precompute -> train ->
LoRA load -> validation in the tests) or ``unsupported`` (why crepa refuses it). ``crepa families``
prints :func:`support_rows`; the README shows :func:`support_markdown`; :func:`check_supported`
refuses an unsupported run from its configs, before any data is scanned or weight loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import diffusers

from crepa.config import ConfigError, RunConfig
from crepa.models.image_conditioning import IMAGE_INPUTS
from crepa.models.registry import FAMILIES, ModelFamily

Task = Literal["T2V", "I2V"]


@dataclass(frozen=True)
class Variant:
    """A published checkpoint line of a registry family.

    tiny: name of the tiny pipeline (:data:`crepa.models.tiny_pipelines.TINY_PIPELINES`) the
    end-to-end tests run for it, None when no test covers it; unsupported: the reason crepa
    refuses it (None: trainable). ``pipeline_class`` is the ``_class_name`` of its
    ``model_index.json``; ``expert_pair``: a Wan 2.2 A14B pipeline with ``transformer_2``.
    """

    family: str
    name: str
    task: Task
    pipeline_class: str
    example: str
    tiny: str | None = None
    unsupported: str | None = None
    expert_pair: bool = False

    @property
    def trainable(self) -> bool:
        return self.unsupported is None


_COSMOS_REASON = (
    "EDM objective (Cosmos 1.0) / flow with [0, 1] timesteps and a padding mask (Predict2), a T5 prompt "
    "encoding and the Cosmos VAE's latent normalisation are not implemented; no tiny pipeline covers them"
)
_ALLEGRO_REASON = (
    "its VAE is not causal (T frames -> T/4 latent frames, no frame of its own for latent frame 0), which "
    "crepa's frame-to-latent reduction and precompute do not handle; its pipeline has no LoRA loader"
)

VARIANTS: tuple[Variant, ...] = (
    Variant(
        "cogvideox", "CogVideoX-2B / 5B", "T2V", "CogVideoXPipeline", "THUDM/CogVideoX-5b", tiny="cogvideox"
    ),
    Variant(
        "cogvideox",
        "CogVideoX1.5-5B (frames 4k+1 with k odd: 77, 85)",
        "T2V",
        "CogVideoXPipeline",
        "THUDM/CogVideoX1.5-5B",
        tiny="cogvideox_1_5",
    ),
    Variant(
        "cogvideox_i2v",
        "CogVideoX-5B-I2V",
        "I2V",
        "CogVideoXImageToVideoPipeline",
        "THUDM/CogVideoX-5b-I2V",
        tiny="cogvideox_i2v",
    ),
    Variant(
        "hunyuanvideo",
        "HunyuanVideo",
        "T2V",
        "HunyuanVideoPipeline",
        "hunyuanvideo-community/HunyuanVideo",
        tiny="hunyuanvideo",
    ),
    Variant(
        "hunyuanvideo",
        "HunyuanVideo-I2V",
        "I2V",
        "HunyuanVideoImageToVideoPipeline",
        "hunyuanvideo-community/HunyuanVideo-I2V",
        unsupported="its image conditioning (LLaVA image tokens in the prompt, first-frame latents) is not "
        "implemented; train the T2V model",
    ),
    Variant(
        "wan", "Wan2.1-T2V-1.3B / 14B", "T2V", "WanPipeline", "Wan-AI/Wan2.1-T2V-14B-Diffusers", tiny="wan"
    ),
    Variant(
        "wan",
        "Wan2.2-T2V-A14B (one expert per run: model.expert)",
        "T2V",
        "WanPipeline",
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        tiny="wan_a14b",
        expert_pair=True,
    ),
    Variant(
        "wan_i2v",
        "Wan2.1-I2V-14B-480P / 720P",
        "I2V",
        "WanImageToVideoPipeline",
        "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        tiny="wan_i2v",
    ),
    Variant(
        "wan_i2v",
        "Wan2.2-I2V-A14B (one expert per run: model.expert)",
        "I2V",
        "WanImageToVideoPipeline",
        "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        tiny="wan_i2v_a14b",
        expert_pair=True,
    ),
    Variant(
        "wan2_2_ti2v",
        "Wan2.2-TI2V-5B",
        "T2V",
        "WanPipeline",
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        tiny="wan2_2_ti2v",
    ),
    Variant(
        "skyreels_v2",
        "SkyReels-V2 T2V",
        "T2V",
        "SkyReelsV2Pipeline",
        "Skywork/SkyReels-V2-T2V-14B-540P-Diffusers",
        tiny="skyreels_v2",
    ),
    Variant("ltx_video", "LTX-Video", "T2V", "LTXPipeline", "Lightricks/LTX-Video", tiny="ltx_video"),
    Variant(
        "ltx_video",
        "LTX-Video image-to-video",
        "I2V",
        "LTXImageToVideoPipeline",
        "Lightricks/LTX-Video",
        unsupported="per-token timesteps for the conditioning frame are not implemented; train the T2V model",
    ),
    Variant("mochi", "Mochi 1", "T2V", "MochiPipeline", "genmo/mochi-1-preview", tiny="mochi"),
    Variant(
        "cosmos",
        "Cosmos-1.0-Diffusion Text2World",
        "T2V",
        "CosmosTextToWorldPipeline",
        "nvidia/Cosmos-1.0-Diffusion-7B-Text2World",
        unsupported=_COSMOS_REASON,
    ),
    Variant(
        "cosmos_predict2",
        "Cosmos-Predict2 Video2World",
        "I2V",
        "Cosmos2VideoToWorldPipeline",
        "nvidia/Cosmos-Predict2-2B-Video2World",
        unsupported=_COSMOS_REASON,
    ),
    Variant("allegro", "Allegro", "T2V", "AllegroPipeline", "rhymes-ai/Allegro", unsupported=_ALLEGRO_REASON),
)


def variants_of(family: ModelFamily) -> list[Variant]:
    return [variant for variant in VARIANTS if variant.family == family.name]


def find_variant(
    family: ModelFamily, pipeline_class: str | None, model_index: Mapping[str, Any]
) -> Variant | None:
    """The variant of a pipeline: its family, ``model_index.json`` class and expert layout."""
    experts = bool((model_index.get("transformer_2") or [None, None])[1])
    candidates = [
        variant
        for variant in variants_of(family)
        if variant.pipeline_class == (pipeline_class or family.pipeline_class)
        and variant.expert_pair == experts
    ]
    trainable = [variant for variant in candidates if variant.trainable]
    return (trainable or candidates or [None])[0]


def unsupported_reason(family: ModelFamily, model_index: Mapping[str, Any]) -> str | None:
    """Why a pipeline (its family and ``model_index.json`` contents) cannot be trained; None if it can."""
    pipeline_class = model_index.get("_class_name")
    variant = find_variant(family, pipeline_class, model_index)
    if variant is None:
        known = ", ".join(sorted({v.pipeline_class for v in variants_of(family)}))
        return (
            f"{family.name} through {pipeline_class} is not in crepa's support matrix (known pipelines for "
            f"{family.name}: {known}); see `crepa families`"
        )
    if variant.unsupported:
        return f"{variant.name} ({variant.task}) is not supported: {variant.unsupported}"
    return None


def check_supported(config: RunConfig, family: ModelFamily) -> None:
    """Refuse a run whose pipeline (``model.pretrained``'s ``model_index.json``) the matrix marks
    unsupported: :class:`~crepa.config.ConfigError` with the reason, before data or weights are read."""
    model = config.model
    try:
        index = diffusers.DiffusionPipeline.load_config(str(model.pretrained), revision=model.revision)
    except OSError as error:
        raise ConfigError(
            f"model.pretrained: cannot read model_index.json of {model.pretrained!r} ({error})"
        ) from None
    reason = unsupported_reason(family, index)
    if reason is not None:
        raise ConfigError(f"model.pretrained: {reason}")
    two_experts = bool((index.get("transformer_2") or [None, None])[1])
    if two_experts and model.expert is None:
        raise ConfigError(
            f"model.expert: {model.pretrained} has two experts; train one per run: 'transformer' (high noise, "
            f"s >= boundary_ratio {index.get('boundary_ratio')}) or 'transformer_2' (low noise, below it)"
        )
    if not two_experts and model.expert == "transformer_2":
        raise ConfigError(f"model.expert: {model.pretrained} has no transformer_2; leave model.expert unset")
    validation = config.validation
    if family.name in IMAGE_INPUTS and validation.every and validation.prompts and not validation.images:
        raise ConfigError(
            f"validation.images: {family.name} generates from a first frame; give one image per prompt"
        )
    missing = [str(image) for image in validation.images if not image.is_file()]
    if missing:
        raise ConfigError(f"validation.images: not found: {', '.join(missing)}")


@dataclass(frozen=True)
class SupportRow:
    """One line of the support matrix."""

    family: str
    variant: str
    task: Task
    trainable: str
    crepa_block: int
    tiny_test: str
    reason: str


def support_rows() -> list[SupportRow]:
    """The matrix, in registry order."""
    rows = []
    for name, family in FAMILIES.items():
        for variant in variants_of(family):
            rows.append(
                SupportRow(
                    family=name,
                    variant=variant.name,
                    task=variant.task,
                    trainable="yes"
                    if variant.trainable and variant.tiny
                    else ("untested" if variant.trainable else "no"),
                    crepa_block=family.default_block_index,
                    tiny_test=variant.tiny or "-",
                    reason=variant.unsupported or "",
                )
            )
    return rows


SUPPORT_COLUMNS = ("family", "variant", "task", "trainable", "CREPA block", "tiny pipeline test", "reason")


def support_markdown() -> str:
    """The matrix as a markdown table (the README's copy is checked against it by the tests)."""
    lines = ["| " + " | ".join(SUPPORT_COLUMNS) + " |", "|" + "---|" * len(SUPPORT_COLUMNS)]
    for row in support_rows():
        cells = (
            row.family,
            row.variant,
            row.task,
            row.trainable,
            str(row.crepa_block),
            row.tiny_test,
            row.reason,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
