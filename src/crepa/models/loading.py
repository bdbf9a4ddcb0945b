"""Model loading shared by training, sampling, export, evaluation and experiments: the family of a run,
its transformer (optionally block-compiled), the pipeline scheduler's noise table and an online teacher.
Nothing here trains; the trainer, the sampler and the evaluators import it alike."""

from __future__ import annotations

import diffusers
import torch
from torch import nn

from crepa.config import ConfigError, RunConfig
from crepa.models.hub import hub_access
from crepa.models.memory import set_gradient_checkpointing
from crepa.models.pipelines import load_components
from crepa.models.pipelines import resolve_family as resolve_pipeline_family
from crepa.models.registry import ModelFamily
from crepa.teachers import load_teacher


def describe_device(device: torch.device | str) -> str:
    """``"cuda:0 (NVIDIA H200)"`` or ``"cpu"``: where a command ran, for its closing message."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def resolve_family(config: RunConfig) -> ModelFamily:
    """The registry entry named by model.family, else the one of the pipeline's transformer class."""
    model = config.model
    try:
        with hub_access(model.pretrained, "model.pretrained"):
            return resolve_pipeline_family(model.pretrained, model.family, model.revision)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{'model.family' if model.family else 'model.pretrained'}: {error}") from None


def load_transformer(config: RunConfig, family: ModelFamily, dtype: torch.dtype) -> nn.Module:
    """The run's transformer (or its ``model.expert`` subfolder) in ``dtype``, its blocks checkpointed
    as ``model.gradient_checkpointing`` asks (all, none or the first N)."""
    transformer_class = getattr(diffusers, family.class_names[0])
    with hub_access(config.model.pretrained, "model.pretrained"):
        transformer = transformer_class.from_pretrained(
            config.model.pretrained,
            subfolder=config.model.expert or "transformer",
            revision=config.model.revision,
            torch_dtype=dtype,
        )
    # model.offload_activations: checkpointed blocks keep their inputs in CPU memory (a GPU run's only)
    host = torch.device("cpu") if config.model.offload_activations and torch.cuda.is_available() else None
    set_gradient_checkpointing(transformer, family, config.model.gradient_checkpointing, host)
    return transformer


def compile_blocks(transformer: nn.Module, family: ModelFamily) -> None:
    """``torch.compile`` each block's ``forward``. Not ``block.compile()``: that compiles the module call
    with its hooks, while here the hooks (CREPA capture, RepVideo gates, FSDP) stay eager around the
    compiled forward, and gradient checkpointing recomputes the compiled forward as any other."""
    for block in family.blocks(transformer):
        block.forward = torch.compile(block.forward)


def scheduler_alphas(config: RunConfig, family: ModelFamily) -> torch.Tensor | None:
    """alpha-bar table of the pipeline's own scheduler, for DDPM objectives (CogVideoX: zero terminal SNR)."""
    if family.objective not in ("v_prediction", "epsilon"):
        return None
    with hub_access(config.model.pretrained, "model.pretrained"):
        index = diffusers.DiffusionPipeline.load_config(
            config.model.pretrained, revision=config.model.revision
        )
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        scheduler = scheduler_class.from_pretrained(
            config.model.pretrained, subfolder="scheduler", revision=config.model.revision
        )
    return scheduler.alphas_cumprod.clone()


def load_online_teacher(config: RunConfig, family: ModelFamily, device: torch.device):
    """(teacher, VAE or None) for the online teacher modes "pixels" and "vae"."""
    with hub_access(config.teacher.name, "teacher.name"):
        teacher = load_teacher(
            config.teacher.name,
            config.teacher.kind,
            device=device,
            # bf16 weights on a GPU: autocast would otherwise cast every weight again for every chunk
            dtype=torch.bfloat16 if device.type == "cuda" else None,
            chunk_size=config.teacher.chunk_size,
        )
    vae = None
    if config.cache.teacher_source == "vae":
        with hub_access(config.model.pretrained, "model.pretrained"):
            components = load_components(
                config.model.pretrained,
                family.name,
                config.model.revision,
                device=device,
                text_encoders=False,
            )
        vae = components.vae
    return teacher, vae
