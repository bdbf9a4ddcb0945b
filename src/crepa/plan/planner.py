"""``crepa plan``: which memory settings fit a GPU budget, fastest first, from the run file alone.

The run file gives the model (a local pipeline folder, or a hub id crepa knows the published config
of: :mod:`crepa.plan.published`), its largest bucket, LoRA / CREPA / teacher settings and the
memory options it asks for; :mod:`crepa.plan.memory` predicts each candidate setting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download

from crepa.config import AlignmentSection, ConfigError, RunConfig
from crepa.models.hub import HubUnreachableError, hub_access
from crepa.models.memory import checkpointed_count
from crepa.models.pipelines import text_length
from crepa.models.registry import ModelFamily, get_family, latent_channels
from crepa.models.registry import family_of as registry_family
from crepa.models.support import VARIANTS
from crepa.plan.memory import (
    GIB,
    Estimate,
    ModelProfile,
    Settings,
    Workload,
    candidate_settings,
    estimate,
    profile_model,
)
from crepa.plan.published import PUBLISHED, PublishedModel, published_by_repo
from crepa.train.parallel import check_fsdp_run

# The CUDA context, cuBLAS workspaces and the caching allocator's slack are not in the prediction:
# a setting fits when its peak leaves this much of the card free.
HEADROOM_BYTES = int(1.5 * GIB)
# (parameters, width) of teachers by size word in their name: DINOv2 ViT-S/B/L/g (with or without registers).
TEACHER_SIZES = {
    "small": (22_000_000, 384),
    "base": (86_000_000, 768),
    "large": (304_000_000, 1024),
    "giant": (1_100_000_000, 1536),
}


OPTION_PENALTY = 0.02


def ranking_seconds(estimate: Estimate) -> float:
    """Predicted step time, ``OPTION_PENALTY`` more per lossy or overhead-bearing option in use."""
    settings = estimate.settings
    options = (
        (settings.base_precision == "fp8")
        + (settings.optimizer == "adamw8bit")
        + (settings.offload_blocks > 0)
        + settings.offload_activations
    )
    return estimate.seconds * (1 + OPTION_PENALTY * options)


def parse_memory(text: str) -> int:
    """``"24GiB"`` / ``"80GB"`` / ``"48"`` (GiB) / ``"0.5GiB"`` -> bytes, above zero."""
    match = re.fullmatch(
        r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(GiB|GB|G|MiB|MB)?\s*", text, flags=re.IGNORECASE
    )
    size = 0
    if match:
        value, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
        size = int(value * {"gib": GIB, "g": GIB, "gb": 1e9, "mib": 2**20, "mb": 1e6}[unit])
    if size <= 0:
        raise ConfigError(
            f"--gpu-memory {text!r}: expected a size above zero, a number with an optional unit (GiB, GB, "
            "MiB or MB; GiB when none), e.g. 24GiB, 80GB or 48"
        )
    return size


def transformer_source(config: RunConfig) -> tuple[str, dict[str, Any]]:
    """(class name, transformer config) of the run's model, no weights read: a local pipeline folder's
    ``config.json``, the published config of a hub id crepa knows, else the hub's ``config.json``
    (from the local cache when offline)."""
    model = config.model
    subfolder = model.expert or "transformer"
    local = Path(model.pretrained) / subfolder
    published = published_by_repo(model.pretrained)
    if published is not None and not local.is_dir():
        return published.class_name, dict(published.config)
    try:
        if local.is_dir():
            path = local / "config.json"
        else:
            with hub_access(model.pretrained, "model.pretrained"):
                path = hf_hub_download(
                    model.pretrained, "config.json", subfolder=subfolder, revision=model.revision
                )
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError, HubUnreachableError):
        raise ConfigError(
            f"model.pretrained: {model.pretrained!r} is neither a local pipeline folder nor a checkpoint whose "
            "published config crepa knows (see `crepa families`), and its transformer config.json cannot be "
            "read; point model.pretrained at a downloaded pipeline folder"
        ) from None
    return loaded["_class_name"], {key: value for key, value in loaded.items() if not key.startswith("_")}


def family_of(class_name: str, transformer_config: dict[str, Any], name: str | None = None) -> ModelFamily:
    """The registry family ``name`` (``model.family``), else the most specific one matching the class
    and config; a :class:`ConfigError` naming the key when there is none or ``name`` is of another class."""
    key = "model.family" if name else "model.pretrained"
    try:
        family = get_family(name) if name else registry_family(class_name, transformer_config)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    if class_name not in family.class_names:
        raise ConfigError(
            f"model.family: {name!r} is a family of {', '.join(family.class_names)}, but model.pretrained's "
            f"transformer is a {class_name}; drop model.family or name a family of that class"
        )
    return family


def latent_shape(
    family: ModelFamily,
    transformer_config: dict[str, Any],
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
) -> tuple[int, int, int, int, int]:
    """(B, C, F, H, W) latents of clips of ``frames`` x ``height`` x ``width`` pixels."""
    latent_frames = (
        1 + (frames - 1) // family.temporal_ratio if family.causal_vae else frames // family.temporal_ratio
    )
    latent_frames += -latent_frames % (transformer_config.get("patch_size_t") or 1)  # the pipeline pads
    return (
        batch,
        latent_channels(transformer_config),
        latent_frames,
        height // family.spatial_ratio,
        width // family.spatial_ratio,
    )


def largest_latent_shape(
    config: RunConfig, family: ModelFamily, transformer_config: dict[str, Any]
) -> tuple[int, int, int, int, int]:
    """(B, C, F, H, W) latents of the run's largest bucket (most tokens)."""
    shapes = [
        latent_shape(family, transformer_config, frames, height, width, config.train.batch_size)
        for frames in config.data.num_frames
        for height, width in config.data.resolutions
    ]
    return max(shapes, key=lambda shape: shape[2] * shape[3] * shape[4])


def published_workload(
    model: PublishedModel, crepa: AlignmentSection | None = None, **config_overrides: Any
) -> Workload:
    """A LoRA (rank 64) workload of a published model at its published shape; ``config_overrides``
    change the transformer config (e.g. fewer blocks)."""
    config = {**model.config, **config_overrides}
    family = family_of(model.class_name, config)
    return Workload(
        class_name=model.class_name,
        config=config,
        latent_shape=latent_shape(family, config, *model.shape),
        text_length=text_length(family, config),
        crepa=crepa,
    )


def teacher_size(name: str) -> tuple[int, int]:
    """(parameters, width) of a DINOv2-style teacher from its name; giant when the name says nothing."""
    lowered = name.lower()
    return next((size for word, size in TEACHER_SIZES.items() if word in lowered), TEACHER_SIZES["giant"])


def workload_of(config: RunConfig, source: tuple[str, dict[str, Any]] | None = None) -> Workload:
    """What ``config`` trains, for the memory model (no weights, no network); ``source`` is the
    transformer's (class name, config) when the caller holds it already (else
    :func:`transformer_source` reads it)."""
    class_name, transformer_config = source or transformer_source(config)
    family = family_of(class_name, transformer_config, config.model.family)
    latent_shape = largest_latent_shape(config, family, transformer_config)
    teacher_params, teacher_dim = teacher_size(config.teacher.name)
    crepa = config.crepa if config.crepa.enabled else None
    online = crepa is not None and crepa.mode != "backbone" and config.cache.teacher_source != "cache"
    frames_tokens = (
        latent_shape[3] * latent_shape[4] * 4
    )  # teacher patches per frame, about 2x the latent grid
    return Workload(
        class_name=class_name,
        config=transformer_config,
        latent_shape=latent_shape,
        text_length=text_length(family, transformer_config),
        lora=config.lora if config.lora.enabled else None,
        crepa=crepa,
        teacher_dim=teacher_dim,
        teacher_params=teacher_params if online else 0,
        # one chunk of frames through the teacher under no_grad: a few (tokens, width) fp16 tensors
        teacher_activation=config.teacher.chunk_size * frames_tokens * teacher_dim * 2 * 6 if online else 0,
        repvideo_window=config.repvideo.window if config.repvideo.enabled else None,
    )


def run_settings(config: RunConfig, depth: int) -> Settings:
    """The memory settings ``config`` asks for."""
    model = config.model
    return Settings(
        checkpointed_count(model.gradient_checkpointing, depth),
        model.offload_blocks,
        model.base_precision,
        config.optim.name,
        model.offload_activations,
    )


@dataclass(frozen=True)
class Plan:
    """The run's own estimate and every candidate's, for a budget per GPU."""

    workload: Workload
    profile: ModelProfile
    budget: int
    gpus: int
    current: Estimate
    candidates: list[Estimate]

    def fits(self, estimate: Estimate) -> bool:
        return estimate.gpu_peak + HEADROOM_BYTES <= self.budget

    def fitting(self) -> list[Estimate]:
        """Settings that fit, fastest first. Each of fp8 weights, 8-bit moments and offload ranks
        ``OPTION_PENALTY`` slower than predicted: they are picked when they buy more than that."""
        return sorted(filter(self.fits, self.candidates), key=ranking_seconds)


def plan_workload(
    workload: Workload, profile: ModelProfile, current: Settings, budget: int, gpus: int = 1
) -> Plan:
    """Estimate ``current`` and every candidate setting for a profiled workload."""
    candidates = [
        estimate(profile, settings, workload, gpus)
        for settings in candidate_settings(
            profile.depth, single_gpu=gpus == 1, repvideo=workload.repvideo_window is not None
        )
    ]
    return Plan(workload, profile, budget, gpus, estimate(profile, current, workload, gpus), candidates)


def plan_run(config: RunConfig, budget: int, gpus: int = 1) -> Plan:
    """Profile the run's model and estimate its own settings and every candidate. Over several GPUs
    the plan is FSDP2's: a run FSDP2 cannot train is refused first (:class:`ConfigError`)."""
    if gpus > 1:
        try:
            check_fsdp_run(config)
        except ConfigError as error:
            raise ConfigError(
                f"--gpus {gpus} plans FSDP2 sharding, which crepa train refuses for this run: {error} "
                "(or plan one GPU with --gpus 1)"
            ) from None
    workload = workload_of(config)
    try:
        profile = profile_model(workload)
    except (RuntimeError, ValueError) as error:  # the model refuses the step the run file describes
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ConfigError(
            f"model.pretrained: {workload.class_name} of {config.model.pretrained!r} cannot take a training "
            f"step on latents {workload.latent_shape} (B, C, F, H, W) of the run's largest bucket: {reason}. "
            "Check its transformer config.json against model.family, data.resolutions and data.num_frames"
        ) from error
    return plan_workload(workload, profile, run_settings(config, profile.depth), budget, gpus)


def memory_warning(config: RunConfig, free_bytes: int, gpus: int = 1) -> str | None:
    """A warning when the run's predicted peak per GPU exceeds ``free_bytes``, naming the settings of
    the fastest candidate that fits (None when the run fits)."""
    plan = plan_run(config, free_bytes, gpus)
    if plan.fits(plan.current):
        return None
    need = f"this run is predicted to need {plan.current.gpu_peak / GIB:.1f} GiB per GPU ({HEADROOM_BYTES / GIB:.1f} GiB headroom on top) and {free_bytes / GIB:.1f} GiB are free"
    fitting = plan.fitting()
    if not fitting:
        return f"{need}; no memory setting fits: lower train.batch_size, data.num_frames or data.resolutions, or shard with FSDP"
    current = plan.current.settings.set_lines(plan.profile.depth)
    changes = [line for line in fitting[0].settings.set_lines(plan.profile.depth) if line not in current]
    return (
        f"{need}; the fastest setting that fits changes {', '.join(changes)} (`crepa plan` lists the others)"
    )


CARDS_GIB = (24, 48, 80)
TABLE_SETTINGS = {
    "every block checkpointed": lambda depth: Settings(depth),
    "none checkpointed": lambda depth: Settings(0),
    "checkpointed + fp8": lambda depth: Settings(depth, base_precision="fp8"),
    "checkpointed + fp8 + offload + 8-bit AdamW": lambda depth: Settings(
        depth, max(depth - 2, 0), "fp8", "adamw8bit"
    ),
    "same + activations offloaded": lambda depth: Settings(
        depth, max(depth - 2, 0), "fp8", "adamw8bit", True
    ),
}


def smallest_card(peak: int) -> str:
    """The smallest of 24 / 48 / 80 GiB cards the peak fits (with the headroom), or "> 80"."""
    return next((f"{card} GB" for card in CARDS_GIB if peak + HEADROOM_BYTES <= card * GIB), "> 80 GB")


def published_table() -> str:
    """Markdown: each published model crepa trains, at its published shape (LoRA rank 64, batch 1,
    CREPA at the family's block), the GPU peak (:attr:`Estimate.gpu_peak`) and the smallest card for
    each of :data:`TABLE_SETTINGS`."""
    trainable = {variant.family for variant in VARIANTS if variant.trainable}
    header = ["model", "frames x height x width", *TABLE_SETTINGS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in PUBLISHED.values():
        family = family_of(model.class_name, model.config)
        if family.name not in trainable:
            continue
        workload = published_workload(model, AlignmentSection(block_index=family.default_block_index))
        profile = profile_model(workload)
        cells = []
        for settings_of in TABLE_SETTINGS.values():
            peak = estimate(profile, settings_of(profile.depth), workload).gpu_peak
            cells.append(f"{peak / GIB:.1f} GiB ({smallest_card(peak)})")
        frames, height, width = model.shape
        lines.append("| " + " | ".join([model.name, f"{frames} x {height} x {width}", *cells]) + " |")
    return "\n".join(lines)
