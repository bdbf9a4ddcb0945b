"""The training recipe: `crepa train` as a readable script built from small components.

    config -> checks (no weights yet) -> transformer (+ LoRA) -> CREPA regularizer -> cached data
    -> optimiser / LR schedule -> accelerate -> loop: noise, forward, diffusion + alignment loss,
    backward, clip, step -> logs, checkpoints, validation -> LoRA + projector + summary

Exact resume: noise and timesteps come from a generator seeded by (seed, step, rank), the batch
order is a function of (seed, position), and checkpoints hold optimiser, LR scheduler, alignment
schedule and the global RNG states (LoRA dropout), so on CPU a resumed run repeats an
uninterrupted one step for step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from crepa.cache.atomic import atomic_write_json
from crepa.cache.dataset import CachedDataset
from crepa.config import ConfigError, RunConfig, check_against_family
from crepa.models import ModelFamily
from crepa.models.conditioning import prediction_to_latents, transformer_inputs
from crepa.models.hub import hub_access
from crepa.models.image_conditioning import image_parts
from crepa.models.pipelines import expert_noise_range, load_components
from crepa.models.pipelines import resolve_family as resolve_pipeline_family
from crepa.models.support import check_supported
from crepa.regularizer import CrepaRegularizer
from crepa.repvideo import install_repvideo
from crepa.runs import RUN_CONFIG_FILE
from crepa.teacher_targets import teacher_targets
from crepa.teachers import load_teacher
from crepa.train import checkpoint as ckpt
from crepa.train.batches import BucketedBatchOrder, batch_loader, default_workers
from crepa.train.guard import UpdateGuard
from crepa.train.lora import add_lora, save_lora
from crepa.train.objectives import (
    NoisedBatch,
    ddpm,
    flow_matching,
    flow_matching_reversed,
    sample_noise_level,
)
from crepa.train.parallel import (
    average_gradients,
    clip_grad_norm,
    exchange_objects,
    launch_sharding,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    shard_transformer,
)
from crepa.train.preflight import check_run, check_skeleton, hold_output

TRAINABLE_OBJECTIVES = ("flow_matching", "flow_matching_reversed", "v_prediction", "epsilon")


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on; the message says what to try."""


@dataclass
class TrainingSummary:
    """What ``training_summary.json`` holds."""

    steps: int
    skipped_nonfinite: int
    seconds: float
    peak_memory_mb: float
    final_metrics: dict[str, float]
    interrupted: bool
    rank_weight_checksums: list[float]
    # per rank: first step trained at weight 0 after the similarity cutoff (None: never cut), and the
    # rank's own score EMA at the end (the cutoff reads their mean)
    rank_cutoff_steps: list[int | None]
    rank_score_ema: list[float | None]
    output_dir: str
    checkpoint: str | None
    parallelism: str  # "single", "ddp" or "fsdp" (FSDP2, blocks sharded)
    processes: int  # the world size: processes that trained together
    config: dict[str, Any] = field(default_factory=dict)
    stop_signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run


# ---------------------------------------------------------------- checks before any weight loads
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


def resolve_family(config: RunConfig) -> ModelFamily:
    """The registry entry named by model.family, else the one of the pipeline's transformer class."""
    model = config.model
    try:
        with hub_access(model.pretrained, "model.pretrained"):
            return resolve_pipeline_family(model.pretrained, model.family, model.revision)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{'model.family' if model.family else 'model.pretrained'}: {error}") from None


def check_model(config: RunConfig, family: ModelFamily) -> None:
    """Impossible combinations found from the configs alone (support matrix, objective, frame counts,
    sizes, block indices)."""
    check_supported(config, family)
    if family.objective not in TRAINABLE_OBJECTIVES:
        raise ConfigError(
            f"model.family: training {family.name} needs the {family.objective!r} objective, which crepa "
            f"does not implement yet (trainable objectives: {', '.join(TRAINABLE_OBJECTIVES)})"
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
    return dataset


# ---------------------------------------------------------------- model
def load_transformer(config: RunConfig, family: ModelFamily, dtype: torch.dtype) -> nn.Module:
    transformer_class = getattr(diffusers, family.class_names[0])
    with hub_access(config.model.pretrained, "model.pretrained"):
        transformer = transformer_class.from_pretrained(
            config.model.pretrained,
            subfolder=config.model.expert or "transformer",
            revision=config.model.revision,
            torch_dtype=dtype,
        )
    if config.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def compile_blocks(transformer: nn.Module, family: ModelFamily) -> None:
    """``torch.compile`` each block's ``forward``. Not ``block.compile()``: that compiles the module call
    with its hooks, while here the hooks (CREPA capture, RepVideo gates, FSDP) stay eager around the
    compiled forward, and gradient checkpointing recomputes the compiled forward as any other."""
    for block in family.blocks(transformer):
        block.forward = torch.compile(block.forward)


def noise_batch(
    config: RunConfig,
    family: ModelFamily,
    latents: torch.Tensor,
    generator: torch.Generator,
    alphas_cumprod,
    noise_range: tuple[float, float] = (0.0, 1.0),
) -> NoisedBatch:
    """The family's objective applied to clean latents (B, C, F, H, W); flow-matching noise levels are
    mapped into ``noise_range`` (one expert of a two-expert pipeline, :func:`expert_noise_range`)."""
    if family.objective in ("v_prediction", "epsilon"):
        return ddpm(latents, alphas_cumprod, generator, family.objective)
    train = config.train
    levels = sample_noise_level(
        latents.shape[0], generator, train.timestep_sampling, train.logit_mean, train.logit_std, train.shift
    )
    low, high = noise_range
    levels = low + (high - low) * levels
    objective = flow_matching if family.objective == "flow_matching" else flow_matching_reversed
    return objective(latents, levels, generator, family.timestep_scale)


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


# ---------------------------------------------------------------- data
def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A loader batch on ``device`` (non-blocking from pinned memory: the copy overlaps the step)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ---------------------------------------------------------------- one step
@dataclass
class StepParts:
    """Everything one training step reads. ``transformer`` is what the loop calls (maybe DDP-wrapped),
    ``model`` the plain module; ``teacher`` / ``vae`` are set for the online teacher modes."""

    config: RunConfig
    family: ModelFamily
    transformer: nn.Module
    model: nn.Module
    regularizer: CrepaRegularizer | None
    teacher: Any
    vae: nn.Module | None
    dtype: torch.dtype
    alphas_cumprod: torch.Tensor | None
    autocast: Callable[[], AbstractContextManager] = nullcontext
    noise_range: tuple[float, float] = (0.0, 1.0)


def batch_text(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The text states of a cached batch for :func:`transformer_inputs` (embeddings in ``dtype``)."""
    text = {key: batch[key].to(dtype) for key in ("prompt_embeds", "pooled_prompt_embeds") if key in batch}
    if "prompt_attention_mask" in batch:
        text["prompt_attention_mask"] = batch["prompt_attention_mask"]
    return text


def batch_teacher_grid(
    config: RunConfig,
    family: ModelFamily,
    model: nn.Module,
    batch: dict[str, Any],
    teacher: Any,
    vae: nn.Module | None,
) -> torch.Tensor | None:
    """Teacher grids (B, F', H', W', D) of a cached batch from ``cache.teacher_source``; None in backbone mode."""
    if config.crepa.mode == "backbone":
        return None
    _, patch_h, patch_w = family.patch_sizes(model)
    _, _, frames, height, width = batch["latents"].shape
    return teacher_targets(
        config.cache.teacher_source,
        batch,
        (frames, height // patch_h, width // patch_w),
        family.temporal_ratio,
        teacher=teacher,
        vae=vae,
        reduce=config.teacher.reduce,
        max_pixels=config.teacher.max_pixels,
        chunk_size=config.teacher.chunk_size,
    )


def step_loss(
    parts: StepParts, batch: dict[str, Any], step: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion + alignment loss of one batch from the cache, and its detached metrics (no host sync)."""
    config, family = parts.config, parts.family
    latents = batch["latents"].to(parts.dtype)
    teacher_grid = None
    if config.crepa.enabled:  # before the forward: no activations wait on the teacher
        teacher_grid = batch_teacher_grid(config, family, parts.model, batch, parts.teacher, parts.vae)
    noised = noise_batch(config, family, latents, generator, parts.alphas_cumprod, parts.noise_range)
    text = batch_text(batch, parts.dtype)
    inputs = transformer_inputs(
        parts.model,
        family,
        noised.noisy,
        noised.timesteps,
        text,
        frame_rate=config.data.fps or 25.0,
        image=image_parts(batch),
    )
    with parts.autocast():  # the projector runs under the transformer's autocast (fp32 weights)
        prediction = parts.transformer(**inputs)[0]
        alignment = parts.regularizer.loss(teacher_grid, step=step) if parts.regularizer is not None else None
    prediction = prediction_to_latents(parts.model, family, prediction, noised.target.shape)
    diffusion_loss = F.mse_loss(prediction.float(), noised.target.float())
    loss = diffusion_loss
    metrics = {"loss/diffusion": diffusion_loss.detach()}
    if alignment is not None:
        loss = loss + alignment.loss
        metrics |= alignment.metrics
    metrics["loss/total"] = loss.detach()
    return loss, metrics


# ---------------------------------------------------------------- the loop
def train(config: RunConfig, resume: str | None = None, progress: bool = True) -> TrainingSummary:
    """Fine-tune ``config.model`` on the precomputed cache; returns (and writes) the summary.
    The output folder is locked for the run (a second run into it is refused)."""
    with hold_output(config):
        return _train(config, resume, progress)


def _train(config: RunConfig, resume: str | None, progress: bool) -> TrainingSummary:
    started = time.perf_counter()
    family = resolve_family(config)
    check_model(config, family)
    source = config.cache.teacher_source
    external_teacher = config.crepa.enabled and config.crepa.mode != "backbone"
    dataset = open_dataset(config, family, external_teacher)
    resume_from = check_run(config, family, dataset, resume)
    sharding = launch_sharding(config)

    output = config.output.dir
    checkpoints = output / "checkpoints"
    dtype, mixed_precision = training_precision(config)
    # accelerate keeps one process-wide state; forget a previous in-process run's mixed precision
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # Without CUDA, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo group.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation,
        log_with=_trackers(config) or None,
        project_dir=str(output),
    )
    set_seed(config.train.seed)
    transformer = load_transformer(config, family, dtype)
    if config.lora.enabled:
        add_lora(transformer, family, config.lora)
    else:
        transformer.requires_grad_(True)
    # Trainable parameters (and so AdamW's state) in fp32 over half-precision frozen weights: a bf16
    # LoRA loses updates below bf16 resolution and GradScaler refuses fp16 gradients.
    cast_training_params(transformer, dtype=torch.float32)
    transformer.train()

    online_teacher, online_vae = None, None
    if external_teacher and source != "cache":
        online_teacher, online_vae = load_online_teacher(config, family, accelerator.device)
    teacher_dim = online_teacher.dim if online_teacher is not None else dataset.teacher_dim

    align = config.crepa
    regularizer = None
    if align.enabled:
        regularizer = CrepaRegularizer(
            transformer, align, teacher_dim=teacher_dim if external_teacher else None
        ).to(accelerator.device)
    # Trained next to the transformer but outside DDP / FSDP: replicated, gradients averaged by hand,
    # files saved apart.
    side_modules: dict[str, nn.Module] = {} if regularizer is None else {"projector": regularizer.projector}
    if config.repvideo.enabled:
        rep = config.repvideo
        side_modules["repvideo_gates"] = install_repvideo(
            transformer, rep.window, rep.gate_init, rep.include_text
        ).to(accelerator.device)
    if sharding == "fsdp":  # replaces the transformer's parameters: before the optimiser sees them
        transformer.to(accelerator.device)
        shard_transformer(transformer, family)
    if config.model.compile:
        compile_blocks(transformer, family)
    param_groups = _param_groups(config, transformer, side_modules)
    optim = config.optim
    optimizer = torch.optim.AdamW(
        param_groups, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )
    lr_scheduler = get_scheduler(
        optim.lr_scheduler,
        optimizer,
        num_warmup_steps=optim.warmup_steps,
        num_training_steps=config.train.max_steps,
    )
    if sharding == "none":
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    modules = {"transformer": accelerator.unwrap_model(transformer), **side_modules}
    names = {id(p): f"{prefix}.{n}" for prefix, m in modules.items() for n, p in m.named_parameters()}
    parts = StepParts(
        config=config,
        family=family,
        transformer=transformer,
        model=accelerator.unwrap_model(transformer),
        regularizer=regularizer,
        teacher=online_teacher,
        vae=online_vae,
        dtype=dtype,
        alphas_cumprod=_to_device(scheduler_alphas(config, family), accelerator.device),
        autocast=accelerator.autocast,
        noise_range=expert_noise_range(config.model.pretrained, config.model.expert, config.model.revision),
    )
    order = BucketedBatchOrder(
        dataset.buckets,
        config.train.batch_size,
        config.train.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
    )

    start_step, position, skipped = 0, 0, 0
    if resume_from is not None:
        tensors, state, rng = ckpt.read_checkpoint(resume_from, accelerator.process_index)
        ckpt.load_trainable_state(modules, tensors)
        load_optimizer_state_by_name(optimizer, state["optimizer"], names)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if regularizer is not None and state.get("alignment_schedule") is not None:
            regularizer.schedule.load_state_dict(state["alignment_schedule"])
        start_step, position, skipped = state["step"], state["position"], state["skipped_nonfinite"]
        if rng is not None:
            ckpt.set_rng_state(rng)
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    metrics_log = output / "metrics.jsonl"
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_log, start_step)
        atomic_write_json(output / RUN_CONFIG_FILE, json.loads(config.model_dump_json()))  # for crepa sample
        accelerator.init_trackers("crepa", config=_flat_hparams(config))

    stop = _StopFlag()
    guard = UpdateGuard(optimizer, [p for group in param_groups for p in group["params"]])
    workers = config.train.num_workers
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    data = batch_loader(dataset, order, position, workers, pin_memory=accelerator.device.type == "cuda")
    bar = tqdm(
        total=config.train.max_steps,
        initial=start_step,
        disable=not (progress and accelerator.is_main_process),
        desc="train",
        unit="step",
    )
    last: dict[str, float] = {}
    nonfinite_streak = 0
    step = start_step
    interrupted = False
    while step < config.train.max_steps:
        step_metrics: dict[str, torch.Tensor] = {}
        accumulation = config.train.gradient_accumulation
        for micro in range(accumulation):
            batch = to_device(next(data), accelerator.device)
            position += 1
            last_micro = micro == accumulation - 1
            with _gradient_sync(accelerator, transformer, sharding, last_micro):
                generator = torch.Generator(accelerator.device).manual_seed(
                    (config.train.seed * 1_000_003 + step) * 4099 + accelerator.process_index
                )
                loss, metrics = step_loss(parts, batch, step, generator)
                step_metrics |= metrics
                accelerator.backward(loss)  # divides by the accumulation count
            if not last_micro:
                continue
            if accelerator.num_processes > 1:
                average_gradients([p for module in side_modules.values() for p in module.parameters()])
            accelerator.unscale_gradients()  # fp16: GradScaler's scale off before the norm
            grad_norm = clip_grad_norm([p for g in param_groups for p in g["params"]], optim.max_grad_norm)
            # The one host sync per optimiser step: an update with a non-finite gradient or leaving
            # non-finite weights is undone (never trained on, never saved). The norm is global.
            grad_ok, weights_ok = guard.step(grad_norm)
            if grad_ok and weights_ok:
                nonfinite_streak = 0
            else:
                skipped += 1
                nonfinite_streak += 1
                what = "gradient" if not grad_ok else "weights after the update"
                if accelerator.is_main_process:
                    bar.write(
                        f"step {step + 1}: non-finite {what}, update undone ({nonfinite_streak} in a row)"
                    )
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_metrics["train/grad_norm"] = grad_norm.detach()
        if nonfinite_streak >= config.train.max_nonfinite_steps:
            raise TrainingStopped(
                f"{nonfinite_streak} optimiser steps in a row had a non-finite loss, gradient or updated weights "
                f"(step {step}; each was undone, no non-finite weight was saved). "
                "Try a lower optim.lr, train.mixed_precision = 'bf16' instead of 'fp16', model.dtype = 'bf16' "
                "or 'fp32', or a smaller crepa.weight."
            )
        step += 1
        bar.update(1)
        if step % config.logging.every == 0 or step == config.train.max_steps:
            last = {key: float(value) for key, value in step_metrics.items()}  # host sync at the log interval
            last["train/lr"] = lr_scheduler.get_last_lr()[0]
            last["train/skipped_nonfinite"] = skipped
            accelerator.log(last, step=step)
            if accelerator.is_main_process:
                _append_metrics(metrics_log, step, last)
            bar.set_postfix(
                loss=f"{last['loss/total']:.4f}", score=f"{last.get('crepa/score', float('nan')):.3f}"
            )
        due = step % config.train.checkpoint_every == 0 or step == config.train.max_steps
        if due or stop.requested:
            _save_checkpoint(
                accelerator,
                checkpoints,
                step,
                position,
                skipped,
                modules,
                names,
                optimizer,
                lr_scheduler,
                regularizer,
                config,
            )
        if (
            config.validation.every
            and config.validation.prompts
            and (step % config.validation.every == 0 or step == config.train.max_steps)
            and (accelerator.is_main_process or sharding == "fsdp")
        ):
            _validate(config, family, accelerator, accelerator.unwrap_model(transformer), sharding, step)
        if stop.requested:
            interrupted = True
            break
    bar.close()
    stop.restore()

    summary = _finish(
        config,
        family,
        accelerator,
        transformer,
        side_modules,
        regularizer,
        step,
        skipped,
        started,
        last,
        interrupted,
        checkpoints,
        stop.signal,
        sharding,
    )
    for tracker in accelerator.trackers:  # not accelerator.end_training(): it destroys the process group,
        tracker.finish()  # whose teardown can hang under gloo (see crepa.train.parallel.exit_process)
    del data  # DataLoader workers stop here
    accelerator.wait_for_everyone()
    return summary


# ---------------------------------------------------------------- pieces of the loop
def _param_groups(
    config: RunConfig, transformer: nn.Module, side_modules: dict[str, nn.Module]
) -> list[dict[str, Any]]:
    """AdamW groups: the transformer's trainable parameters, the projector, the RepVideo gates."""
    groups: list[dict[str, Any]] = [
        {"params": [p for p in transformer.parameters() if p.requires_grad], "lr": config.optim.lr}
    ]
    if "projector" in side_modules:
        groups.append(
            {"params": list(side_modules["projector"].parameters()), "lr": config.crepa.lr or config.optim.lr}
        )
    if "repvideo_gates" in side_modules:
        # no weight decay: it would pull every gate (one vector) towards 0, gated or not
        groups.append(
            {
                "params": list(side_modules["repvideo_gates"].parameters()),
                "lr": config.repvideo.lr or config.optim.lr,
                "weight_decay": 0.0,
            }
        )
    return groups


def _gradient_sync(accelerator, transformer, sharding: str, sync: bool) -> AbstractContextManager:
    """Gradient reduction of the transformer only on the last micro-batch of an accumulation."""
    if sharding == "fsdp":
        transformer.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else accelerator.no_sync(transformer)


def _validate(config, family, accelerator, model: nn.Module, sharding: str, step: int) -> None:
    """Sample the validation prompts. A sharded model's forward is a collective, so under FSDP every
    rank samples (the same clips) and only rank 0's files are kept."""
    from crepa.train.validation import run_validation

    if accelerator.is_main_process:
        run_validation(config, family, model, config.output.dir / "validation", step)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            run_validation(config, family, model, Path(scratch), step)
    if sharding == "fsdp":
        accelerator.wait_for_everyone()


def _to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _save_checkpoint(
    accelerator, root, step, position, skipped, modules, names, optimizer, lr_scheduler, regularizer, config
) -> None:
    staged = ckpt.staging_dir(root, step)
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    # every rank takes part in gathering sharded tensors; rank 0 writes them
    tensors = ckpt.trainable_state(modules)
    optimizer_state = optimizer_state_by_name(optimizer, names)
    state = None
    if main:
        state = {
            "step": step,
            "position": position,
            "skipped_nonfinite": skipped,
            "optimizer": optimizer_state,
            "lr_scheduler": lr_scheduler.state_dict(),
            "alignment_schedule": None if regularizer is None else regularizer.schedule.state_dict(),
            "config": json.loads(config.model_dump_json()),
        }
    ckpt.write_checkpoint_files(staged, tensors if main else None, state, accelerator.process_index)
    accelerator.wait_for_everyone()
    if main:
        ckpt.publish_checkpoint(root, step, config.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def _finish(
    config,
    family,
    accelerator,
    transformer,
    side_modules,
    regularizer,
    step,
    skipped,
    started,
    last,
    interrupted,
    root,
    stop_signal,
    sharding,
):
    output = config.output.dir
    modules = {"transformer": accelerator.unwrap_model(transformer), **side_modules}
    # float64 sum of |w| per rank: equal on every rank when data parallelism kept them in sync
    trained = ckpt.trainable_state(modules)  # whole tensors (gathered from the shards under FSDP)
    checksum = float(sum(tensor.double().abs().sum() for tensor in trained.values()))
    schedule = None if regularizer is None else regularizer.schedule
    local_ema = None if schedule is None or schedule.local_ema is None else float(schedule.local_ema)
    cutoff = None if schedule is None else schedule.cut_step
    per_rank = [(checksum, cutoff, local_ema)]
    per_rank = exchange_objects(per_rank[0]) if accelerator.num_processes > 1 else per_rank
    latest = ckpt.checkpoint_dirs(root)
    summary = TrainingSummary(
        steps=step,
        skipped_nonfinite=skipped,
        seconds=time.perf_counter() - started,
        peak_memory_mb=_peak_memory_mb(),
        final_metrics=last,
        interrupted=interrupted,
        rank_weight_checksums=[entry[0] for entry in per_rank],
        rank_cutoff_steps=[entry[1] for entry in per_rank],
        rank_score_ema=[entry[2] for entry in per_rank],
        output_dir=str(output),
        checkpoint=str(latest[-1]) if latest else None,
        parallelism=sharding
        if sharding != "none"
        else ("ddp" if accelerator.num_processes > 1 else "single"),
        processes=accelerator.num_processes,
        config=json.loads(config.model_dump_json()),
        stop_signal=stop_signal,
    )
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(transformer)
        if config.lora.enabled:
            prefix = "transformer."
            lora = {
                key.removeprefix(prefix): value for key, value in trained.items() if key.startswith(prefix)
            }
            save_lora(unwrapped, family, output, state=lora)
        else:
            unwrapped.save_pretrained(output / "transformer")
        for name, module in side_modules.items():  # projector.safetensors, repvideo_gates.safetensors
            tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
            save_file(tensors, str(output / f"{name}.safetensors"))
        atomic_write_json(output / "training_summary.json", asdict(summary))
    return summary


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _trackers(config: RunConfig) -> list[str]:
    trackers = []
    if config.logging.tensorboard:
        trackers.append("tensorboard")
    if config.logging.wandb:
        trackers.append("wandb")
    return trackers


def _flat_hparams(config: RunConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in json.loads(config.model_dump_json()).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _append_metrics(path: Path, step: int, metrics: dict[str, float]) -> None:
    with open(path, "a") as handle:
        handle.write(
            json.dumps({"step": step, **{k: (None if math.isnan(v) else v) for k, v in metrics.items()}})
            + "\n"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged steps after ``step`` (a killed run logged steps its last checkpoint does not hold)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short (killed run, full disk) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class _StopFlag:
    """Ctrl-C / SIGTERM ask for a checkpoint at the end of the current step, then a clean stop."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
