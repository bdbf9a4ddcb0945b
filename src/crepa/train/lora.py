"""LoRA through peft on a diffusers video transformer, saved in the diffusers LoRA format.

The saved file is what ``pipeline.load_lora_weights(path)`` of the family's pipeline reads (and what
ComfyUI-style loaders convert from): ``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed
peft keys, written by the pipeline class's own ``save_lora_weights`` (or, for pipelines without one,
the same file plus peft's ``adapter_config.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save
from torch import nn

from crepa.cache.atomic import atomic_write_bytes
from crepa.config import LoraSection
from crepa.models.registry import ModelFamily
from crepa.rundir import LORA_FILE


def lora_config(family: ModelFamily, settings: LoraSection) -> LoraConfig:
    """The peft config of a run's adapter (``settings.variant``: LoRA, or DoRA = LoRA with a learned
    magnitude per output): rank, alpha, dropout, and ``settings.targets`` or the family's regex."""
    targets = settings.targets if settings.targets is not None else family.lora_target_regex
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        init_lora_weights=True,
        use_dora=settings.variant == "dora",
    )


def add_lora(transformer: nn.Module, family: ModelFamily, settings: LoraSection) -> list[nn.Parameter]:
    """Freeze ``transformer`` and add LoRA (or DoRA) adapters to the family's attention projections.

    Returns the trainable adapter parameters. Transformers without diffusers' ``add_adapter`` (Allegro)
    get peft's ``inject_adapter_in_model``. ``settings.targets`` overrides the family's regex.
    """
    config = lora_config(family, settings)
    targets = config.target_modules
    transformer.requires_grad_(False)
    try:
        if hasattr(transformer, "add_adapter"):
            transformer.add_adapter(config)
        else:
            inject_adapter_in_model(config, transformer)
    except ValueError as error:
        raise ValueError(
            f"lora.targets: {targets!r} matches no module of {type(transformer).__name__} ({error})"
        ) from None
    params = [param for name, param in transformer.named_parameters() if "lora_" in name]
    for param in params:
        param.requires_grad_(True)
    return params


def lora_state_dict(
    transformer: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``transformer`` (or of its parameter dict ``state``, e.g. whole tensors
    gathered from shards) with peft's key names (adapter name stripped)."""
    return get_peft_model_state_dict(transformer, state_dict=state)


def save_lora(
    transformer: nn.Module,
    family: ModelFamily,
    directory: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    weight_name: str = LORA_FILE,
) -> Path:
    """Write the LoRA in the diffusers format of the family's pipeline; returns the file path.
    ``state``: the transformer's parameters by name when they are not its own (sharded training);
    ``weight_name``: the file name (``load_lora_weights(directory, weight_name=...)`` reads another)."""
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in lora_state_dict(transformer, state).items()
    }
    config = getattr(transformer, "peft_config", {}).get("default")  # inject_adapter_in_model keeps none
    return save_lora_tensors(state, family, config, directory, weight_name)


def save_lora_tensors(
    tensors: dict[str, torch.Tensor],
    family: ModelFamily,
    config: LoraConfig | None,
    directory: str | Path,
    weight_name: str = LORA_FILE,
) -> Path:
    """LoRA tensors (peft names, no adapter name) in the diffusers format of the family's pipeline,
    with the LoRA config as metadata: without it ``load_lora_weights`` takes alpha = rank and
    scales the LoRA by 1 instead of alpha / rank. Returns the file path."""
    directory = Path(directory)
    pipeline_class = getattr(diffusers, family.pipeline_class)
    if not hasattr(pipeline_class, "save_lora_weights"):  # e.g. AllegroPipeline, the Cosmos pipelines
        return _save_generic_lora(tensors, config, directory, weight_name)
    pipeline_class.save_lora_weights(
        directory,
        transformer_lora_layers=tensors,
        weight_name=weight_name,
        safe_serialization=True,
        transformer_lora_adapter_metadata=None if config is None else config.to_dict(),
    )
    return directory / weight_name


ADAPTER_CONFIG = "adapter_config.json"


def _save_generic_lora(
    tensors: dict[str, torch.Tensor], config: LoraConfig | None, directory: Path, weight_name: str
) -> Path:
    """The same file for pipelines without a LoRA loader: ``transformer.``-prefixed peft keys with the
    LoRA config in the safetensors metadata (``lora_adapter_metadata``, as diffusers writes it), so
    ``transformer.load_lora_adapter(directory, prefix="transformer")`` reads it; plus peft's
    ``adapter_config.json`` for peft's own loaders (``set_peft_model_state_dict``)."""
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if config is not None:
        settings = config.to_dict()
        settings["target_modules"] = (
            sorted(settings["target_modules"])
            if isinstance(settings["target_modules"], (set, list, tuple))
            else settings["target_modules"]
        )
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(settings, sort_keys=True, default=str)
        atomic_write_bytes(directory / ADAPTER_CONFIG, metadata[LORA_ADAPTER_METADATA_KEY].encode())
    prefixed = {f"transformer.{name}": tensor for name, tensor in tensors.items()}
    atomic_write_bytes(directory / weight_name, save(prefixed, metadata=metadata))
    return directory / weight_name
