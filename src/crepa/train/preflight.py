"""Checks of a training run before any weight or sample is read: everything a run file, the cache
and the output folder can get wrong becomes a :class:`~crepa.config.ConfigError` naming the key.

- the model skeleton (meta device, from the transformer config): LoRA targets, validation sizes;
- the environment: optional packages a setting needs, output.dir usable;
- the cache: it was built from this run file (the part keys are recomputed and compared), holds
  enough samples for one batch;
- ``--resume``: the checkpoint exists and was written with compatible settings;
- the model: support matrix, objective, frame counts, sizes and block indices from the configs alone.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from crepa.cache.dataset import CachedDataset
from crepa.cache.keys import FileHasher, clip_facts
from crepa.config import ConfigError, RunConfig, check_against_family, check_optional_dependencies
from crepa.generation import VALIDATION_KEYS, GenerationSettings, shape_problems
from crepa.lock import check_not_written, hold
from crepa.models import ModelFamily
from crepa.models.hub import hub_access
from crepa.models.memory import checkpointed_count
from crepa.models.pipelines import read_transformer_config
from crepa.models.support import check_supported
from crepa.precompute import (
    FILE_HASHES,
    CacheIdentity,
    check_teacher_settings,
    read_json,
    uses_cached_teacher,
)
from crepa.rundir import CHECKPOINTS_DIR
from crepa.train import checkpoint as ckpt
from crepa.train.lora import add_lora
from crepa.train.objectives import FLOW_ONLY_WEIGHTINGS

# Facts of a cache that depend on the machine it was built on, not on the run file: a cache built
# in fp32 on a CPU serves a bf16 run on a GPU (the latents are stored in float16 either way).
_MACHINE_FACTS = ("dtype", "teacher.compute")
# Where each recorded fact comes from in the run file.
_FACT_KEYS = {
    "family": "model.family",
    "vae": "model.pretrained / cache.vae_tiling (VAE / image-encoder weights)",
    "text_encoders": "model.pretrained (text encoders)",
    "text_length": "model.pretrained (text length)",
    "teacher.model": "teacher.name (teacher weights)",
}


TRAINABLE_OBJECTIVES = ("flow_matching", "flow_matching_reversed", "v_prediction", "epsilon")


def training_precision(config: RunConfig) -> tuple[torch.dtype, str]:
    """(frozen weights' dtype, accelerate mixed precision). Half-precision weights always run under
    autocast of their dtype (with GradScaler for fp16) over fp32 trainable parameters."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.model.torch_dtype(device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("model.dtype: 'fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on the CPU")
    mixed = config.train.mixed_precision
    if mixed == "no" and dtype != torch.float32:
        mixed = "bf16" if dtype == torch.bfloat16 else "fp16"
    return dtype, mixed


def check_skeleton(config: RunConfig, family: ModelFamily, skeleton: nn.Module) -> None:
    """Checks on the transformer built on the meta device (no weights): LoRA targets match a module,
    validation clips have a size the model can produce."""
    problems = validation_problems(config, family, skeleton)
    if config.lora.enabled:
        try:
            add_lora(skeleton, family, config.lora)
        except ValueError as error:
            problems.append(
                f"{error}; leave lora.targets unset for the {family.name} default or name module paths "
                "such as 'attn1.to_q'"
            )
    if problems:
        raise ConfigError("invalid run file\n  " + "\n  ".join(problems))


def validation_problems(config: RunConfig, family: ModelFamily, skeleton: nn.Module) -> list[str]:
    """validation.num_frames / height / width the model cannot generate (never silently rounded)."""
    if not (config.validation.every and config.validation.prompts):
        return []
    return shape_problems(
        family, skeleton, GenerationSettings.from_validation(config.validation), VALIDATION_KEYS
    )


def check_model(config: RunConfig, family: ModelFamily) -> None:
    """Impossible combinations found from the configs alone (support matrix, objective, frame counts,
    sizes, block indices)."""
    check_supported(config, family)
    if family.objective not in TRAINABLE_OBJECTIVES:
        raise ConfigError(
            f"model.family: training {family.name} needs the {family.objective!r} objective, which crepa "
            f"does not implement yet (trainable objectives: {', '.join(TRAINABLE_OBJECTIVES)})"
        )
    weighting = config.train.loss_weighting
    if weighting in FLOW_ONLY_WEIGHTINGS and not family.objective.startswith("flow_matching"):
        raise ConfigError(
            f"train.loss_weighting: {weighting!r} is defined on the flow-matching noise level, but "
            f"{family.name} trains the DDPM {family.objective!r} objective; use 'min_snr' or 'none'"
        )
    transformer_class = getattr(diffusers, family.class_names[0])
    try:
        with hub_access(config.model.pretrained, "model.pretrained"):
            transformer_config = transformer_class.load_config(
                config.model.pretrained,
                subfolder=config.model.expert or "transformer",
                revision=config.model.revision,
            )
    except OSError as error:
        raise ConfigError(
            f"model.pretrained: cannot read the transformer config of {config.model.pretrained!r} ({error})"
        ) from None
    with torch.device("meta"):
        skeleton = transformer_class.from_config(transformer_config)
    patch_t, patch_h, patch_w = family.patch_sizes(skeleton)
    multiples = (family.spatial_ratio * patch_h, family.spatial_ratio * patch_w)
    check_against_family(
        config,
        family.temporal_ratio,
        multiples,
        family.causal_vae,
        len(family.blocks(skeleton)),
        temporal_patch=patch_t,
    )
    check_skeleton(config, family, skeleton)
    check_memory_options(config, len(family.blocks(skeleton)))


def check_memory_options(config: RunConfig, depth: int) -> None:
    """``model.gradient_checkpointing`` / ``model.offload_blocks`` within the model's ``depth`` blocks,
    offloaded blocks and activations only with checkpointing, offloaded activations not with RepVideo,
    ``optim.name = "adamw8bit"`` where bitsandbytes runs."""
    model = config.model
    problems = []
    checkpointing = model.gradient_checkpointing
    if checkpointing is not True and checkpointing is not False and checkpointing > depth:
        problems.append(
            f"model.gradient_checkpointing: {checkpointing} blocks, but the model has {depth}; "
            f"use 0..{depth} or true"
        )
    checkpointed = checkpointed_count(checkpointing, depth)
    if model.offload_blocks > depth:
        problems.append(f"model.offload_blocks: {model.offload_blocks}, but the model has {depth} blocks")
    elif model.offload_blocks > checkpointed:
        problems.append(
            f"model.offload_blocks: {model.offload_blocks} blocks offloaded but only {checkpointed} checkpointed; "
            "autograd keeps a non-checkpointed block's weights on the GPU until its backward: set "
            f"model.gradient_checkpointing = true (or >= {model.offload_blocks}), or fewer model.offload_blocks"
        )
    if model.offload_activations and checkpointed == 0:
        problems.append(
            "model.offload_activations: only checkpointed blocks keep their inputs in CPU memory, and none is "
            "checkpointed; set model.gradient_checkpointing = true (or N), or model.offload_activations = false"
        )
    if model.offload_activations and config.repvideo.enabled:
        problems.append(
            "model.offload_activations: RepVideo recomputes each gated block from the very inputs the forward "
            "gave it, which activation offload replaces by copies back from CPU memory; set "
            "model.offload_activations = false (block offload and fp8 weights work with RepVideo), or "
            "repvideo.enabled = false"
        )
    if config.optim.name == "adamw8bit" and not (
        torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    ):
        problems.append(
            "optim.name: 'adamw8bit' runs bitsandbytes' 8-bit AdamW, which needs a CUDA GPU and "
            "`pip install bitsandbytes`; use optim.name = 'adamw'"
        )
    if problems:
        raise ConfigError("invalid run file\n  " + "\n  ".join(problems))


def open_dataset(config: RunConfig, family: ModelFamily, external_teacher: bool) -> CachedDataset:
    """The cache, checked against the run: same family, teacher grids present when they are read."""
    source = config.cache.teacher_source
    try:
        dataset = CachedDataset(
            config.cache.dir,
            teacher=external_teacher and source == "cache",
            frames=external_teacher and source == "pixels",
        )
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"cache.dir: {error}") from None
    if dataset.manifest.family != family.name:
        raise ConfigError(
            f"cache.dir: {dataset.cache_dir} was precomputed for family {dataset.manifest.family!r}, "
            f"not {family.name!r}; run `crepa precompute` with this run file or point cache.dir elsewhere"
        )
    if config.data.caption_dropout > 0 and dataset.manifest.null_text is None:
        raise ConfigError(
            f"data.caption_dropout: {dataset.cache_dir} holds no empty-prompt embedding to drop captions "
            "to; run `crepa precompute` with this run file, or set data.caption_dropout = 0"
        )
    return dataset


def check_output_dir(config: RunConfig) -> None:
    """output.dir is a directory (or can become one) that this user can write."""
    output = config.output.dir
    existing = next((path for path in (output, *output.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(
            f"output.dir: {existing} is an existing file, not a folder; choose another output.dir"
        )
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir: {existing} is not writable by this user; choose another output.dir")


def check_batch_size(config: RunConfig, dataset: CachedDataset) -> None:
    """One batch of ``train.batch_size`` per process fits in a bucket (a batch never mixes shapes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    counts: dict[tuple[int, int, int], int] = {}
    for bucket in dataset.buckets:
        counts[bucket] = counts.get(bucket, 0) + 1
    largest = max(counts.values(), default=0)
    if largest == 0:
        raise ConfigError(
            f"cache.dir: {dataset.cache_dir} holds no sample (precompute found no usable clip in "
            f"data.source); add clips or fix data.source, then run `crepa precompute`"
        )
    if largest < config.train.batch_size * world:
        per_bucket = ", ".join(f"{t}x{h}x{w}: {n}" for (t, h, w), n in sorted(counts.items()))
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} x {world} process(es) is more than the largest "
            f"bucket of the cache holds ({largest} samples; frames x height x width: {per_bucket}); use "
            f"train.batch_size <= {max(1, largest // world)} or add clips"
        )


def _flatten(document: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (document or {}).items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fact_key(fact: str) -> str:
    if fact in _FACT_KEYS:
        return _FACT_KEYS[fact]
    if fact.startswith("sampling."):
        return "data." + fact.removeprefix("sampling.")
    return fact  # teacher.name, teacher.kind, ... are run-file keys as they are


def check_cache_agreement(config: RunConfig, family: ModelFamily, dataset: CachedDataset) -> None:
    """Refuse a cache that was not built from this run file: the recorded facts (model, VAE and text
    encoder weights, teacher, sampling) must equal the run file's, and every entry's part keys,
    recomputed from its clip, must be the ones the manifest names (a hand-edited manifest fails)."""

    manifest = dataset.manifest
    rerun = (
        "run `crepa precompute` with this run file (it recomputes only what changed), or point cache.dir "
        "at the cache built for it"
    )
    if manifest.identity is None:
        raise ConfigError(
            f"cache.dir: {dataset.cache_dir} was built by an older crepa that did not record its settings; {rerun}"
        )
    try:
        transformer_config = read_transformer_config(config.model.pretrained, family, config.model.revision)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained: {error}") from None
    identity = CacheIdentity(config, family, transformer_config, torch.float32, torch.device("cpu"))
    recorded = manifest.identity
    # keep the machine-dependent facts of the cache (see _MACHINE_FACTS)
    identity.dtype = recorded["dtype"]
    read_teacher = uses_cached_teacher(config)
    if identity.teacher is not None and recorded.get("teacher"):
        identity.teacher["compute"] = recorded["teacher"]["compute"]
    current = _flatten({**identity.facts(), "teacher": identity.teacher if read_teacher else None})
    saved = _flatten({**recorded, "teacher": recorded.get("teacher") if read_teacher else None})
    differences = [
        f"{_fact_key(fact)}: cache built with {saved.get(fact)!r}, run file gives {current.get(fact)!r}"
        for fact in sorted(set(current) | set(saved))
        if fact not in _MACHINE_FACTS and current.get(fact) != saved.get(fact)
    ]
    if differences:
        raise ConfigError(
            f"cache.dir: {dataset.cache_dir} was precomputed with other settings than this run file\n  "
            + "\n  ".join(differences)
            + f"\n  {rerun}"
        )
    hasher = FileHasher(read_json(dataset.cache_dir / FILE_HASHES, {}))
    wrong = []
    for entry in manifest.entries:
        try:
            clip = clip_facts(hasher(entry.video), entry.frame_indices, entry.size)
        except OSError:
            wrong.append(f"{entry.video}: the video is gone")
            continue
        expected = identity.parts(clip, entry.caption, entry.grid)
        kinds = [kind for kind, key in expected.items() if entry.parts.get(kind) != key]
        if kinds:
            wrong.append(f"{entry.video}: {', '.join(kinds)} part(s) do not belong to this clip")
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ConfigError(
            f"cache.dir: {dataset.cache_dir}/manifest.json does not match its clips (edited by hand, or a "
            f"video changed since precompute)\n  " + "\n  ".join(wrong[:3]) + f"{more}\n  {rerun}"
        )


@contextmanager
def hold_output(config: RunConfig) -> Iterator[None]:
    """Own output.dir for the run (only the main process locks; see :mod:`crepa.lock`)."""
    check_output_dir(config)
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with hold(config.output.dir, "output.dir", "crepa train"):
        yield


def check_run(
    config: RunConfig, family: ModelFamily, dataset: CachedDataset, resume: str | None
) -> Path | None:
    """The checks of a training run that need no model (see the module docstring); returns the
    checkpoint to resume from, if any."""

    check_optional_dependencies(config)
    check_output_dir(config)
    if config.crepa.enabled and config.crepa.mode != "backbone" and config.cache.teacher_source != "cache":
        check_teacher_settings(config)  # the online teacher is loaded in the run
    check_not_written(dataset.cache_dir, "cache.dir")
    check_cache_agreement(config, family, dataset)
    check_batch_size(config, dataset)
    resume_from = ckpt.resolve_resume(config.output.dir / CHECKPOINTS_DIR, resume)
    if resume_from is not None:
        ckpt.check_resume_settings(resume_from, config)
    return resume_from
