"""Set-up of a training run, one ``_setup_*`` per part: :func:`build_run` turns a checked run file
into a :class:`~crepa.train.state.TrainState` (accelerator, transformer + LoRA, regularizer and
side modules, optimiser and LR schedule, step parts, resumed progress, output folder, batch loader).
The order of the random draws (LoRA, projector, gates after ``set_seed``) is part of exact resume."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from torch import nn

from crepa.cache.atomic import atomic_write_json
from crepa.cache.dataset import CachedDataset
from crepa.config import RunConfig
from crepa.data.mixture import source_shares_report
from crepa.models import ModelFamily
from crepa.models.loading import (
    compile_blocks,
    load_online_teacher,
    load_transformer,
    resolve_family,
    scheduler_alphas,
)
from crepa.models.memory import offload_blocks, store_in_fp8
from crepa.models.pipelines import expert_noise_range
from crepa.regularizer import CrepaRegularizer
from crepa.repvideo import install_repvideo
from crepa.rundir import CHECKPOINTS_DIR, METRICS_FILE, RUN_CONFIG_FILE
from crepa.train import checkpoint as ckpt
from crepa.train.batches import BucketedBatchOrder, batch_loader, default_workers
from crepa.train.caption_dropout import CaptionDropout
from crepa.train.ema import WeightEMA
from crepa.train.guard import UpdateGuard
from crepa.train.lora import add_lora
from crepa.train.parallel import launch_sharding, shard_transformer
from crepa.train.preflight import check_model, check_run, open_dataset, training_precision
from crepa.train.state import TrainState
from crepa.train.step import StepParts


def build_run(config: RunConfig, resume: str | None) -> TrainState:
    """Check the run (no weights yet), then load and wire every part; resumes from ``resume``."""
    started = time.perf_counter()
    family = resolve_family(config)
    check_model(config, family)
    external_teacher = config.crepa.enabled and config.crepa.mode != "backbone"
    dataset = open_dataset(config, family, external_teacher)
    resume_from = check_run(config, family, dataset, resume)
    sharding = launch_sharding(config)
    dtype, mixed_precision = training_precision(config)
    accelerator = _setup_accelerator(config, mixed_precision)
    set_seed(config.train.seed)
    transformer = _setup_transformer(config, family, dtype)
    online_teacher, online_vae = None, None
    if external_teacher and config.cache.teacher_source != "cache":
        online_teacher, online_vae = load_online_teacher(config, family, accelerator.device)
    teacher_dim = online_teacher.dim if online_teacher is not None else dataset.teacher_dim
    regularizer, side_modules = _setup_side_modules(
        config, transformer, teacher_dim if external_teacher else None, accelerator.device
    )
    if sharding == "fsdp":  # replaces the transformer's parameters: before the optimiser sees them
        transformer.to(accelerator.device)
        shard_transformer(transformer, family)
    if config.model.compile:
        compile_blocks(transformer, family)
    param_groups = _param_groups(config, transformer, side_modules)
    optimizer, lr_scheduler = build_optimizer(config, param_groups)
    if sharding == "none":
        offload = config.model.offload_blocks
        if offload:  # places the model itself: the offloaded blocks stay on the CPU
            offload_blocks(transformer, family, offload, accelerator.device)
        transformer, optimizer = accelerator.prepare(
            transformer, optimizer, device_placement=[not offload, True]
        )
    model = accelerator.unwrap_model(transformer)
    modules = {"transformer": model, **side_modules}
    alphas = scheduler_alphas(config, family)
    parts = StepParts(
        config=config,
        family=family,
        transformer=transformer,
        model=model,
        regularizer=regularizer,
        teacher=online_teacher,
        vae=online_vae,
        dtype=dtype,
        alphas_cumprod=None if alphas is None else alphas.to(accelerator.device),
        autocast=accelerator.autocast,
        noise_range=expert_noise_range(config.model.pretrained, config.model.expert, config.model.revision),
    )
    trainable = [p for group in param_groups for p in group["params"]]
    state = TrainState(
        parts=parts,
        accelerator=accelerator,
        sharding=sharding,
        side_modules=side_modules,
        modules=modules,
        names={id(p): f"{prefix}.{n}" for prefix, m in modules.items() for n, p in m.named_parameters()},
        trainable=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        guard=UpdateGuard(optimizer, trainable),
        checkpoints=config.output.dir / CHECKPOINTS_DIR,
        metrics_log=config.output.dir / METRICS_FILE,
        started=started,
    )
    state.ema = _setup_ema(state)
    if resume_from is not None:
        _resume(state, resume_from)
        state.start_step = state.progress.step
    _setup_output(state)
    state.data = _setup_data(state, dataset)
    return state


def _setup_accelerator(config: RunConfig, mixed_precision: str) -> Accelerator:
    # accelerate keeps one process-wide state; forget a previous in-process run's mixed precision
    AcceleratorState._reset_state()
    return Accelerator(
        # Without CUDA, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo group.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation,
        log_with=_trackers(config) or None,
        project_dir=str(config.output.dir),
    )


def _setup_transformer(config: RunConfig, family: ModelFamily, dtype: torch.dtype) -> nn.Module:
    """The transformer in training mode: LoRA added, or every weight trainable."""
    transformer = load_transformer(config, family, dtype)
    if config.lora.enabled:
        add_lora(transformer, family, config.lora)
    else:
        transformer.requires_grad_(True)
    # Trainable parameters (and so AdamW's state) in fp32 over half-precision frozen weights: a bf16
    # LoRA loses updates below bf16 resolution and GradScaler refuses fp16 gradients.
    cast_training_params(transformer, dtype=torch.float32)
    if config.model.base_precision == "fp8":
        store_in_fp8(transformer, compute_dtype=dtype)
    transformer.train()
    return transformer


def _setup_side_modules(
    config: RunConfig, transformer: nn.Module, teacher_dim: int | None, device: torch.device
) -> tuple[CrepaRegularizer | None, dict[str, nn.Module]]:
    """The CREPA regularizer and the modules trained next to the transformer but outside DDP / FSDP
    (replicated, gradients averaged by hand, files saved apart): projector, RepVideo gates."""
    regularizer = None
    if config.crepa.enabled:
        regularizer = CrepaRegularizer(transformer, config.crepa, teacher_dim=teacher_dim).to(device)
    side_modules: dict[str, nn.Module] = {} if regularizer is None else {"projector": regularizer.projector}
    if config.repvideo.enabled:
        rep = config.repvideo
        side_modules["repvideo_gates"] = install_repvideo(
            transformer, rep.window, rep.gate_init, rep.include_text
        ).to(device)
    return regularizer, side_modules


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


def build_optimizer(config: RunConfig, param_groups: list[dict[str, Any]]):
    """AdamW (``optim.name``: torch's, or bitsandbytes' 8-bit) over ``param_groups`` and the LR
    schedule of ``optim.lr_scheduler``."""
    optim = config.optim
    adamw = torch.optim.AdamW
    if optim.name == "adamw8bit":
        import bitsandbytes  # checked by preflight: installed, on a CUDA GPU

        adamw = bitsandbytes.optim.AdamW8bit
    optimizer = adamw(param_groups, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    lr_scheduler = get_scheduler(
        optim.lr_scheduler,
        optimizer,
        num_warmup_steps=optim.warmup_steps,
        num_training_steps=config.train.max_steps,
    )
    return optimizer, lr_scheduler


def _setup_ema(state: TrainState) -> WeightEMA | None:
    """The EMA of every trainable tensor under its checkpoint name (``ema.enabled``), else None."""
    if not state.config.ema.enabled:
        return None
    ema = state.config.ema
    params = ckpt.trainable_parameters(state.modules)
    return WeightEMA(params, ema.decay, ema.update_every, ema.start_step, ema.device)


def _resume(state: TrainState, checkpoint: Path) -> None:
    """Trainable weights, optimiser / schedules / progress and this rank's RNG from ``checkpoint``."""
    accelerator = state.accelerator
    tensors, saved, rng = ckpt.read_checkpoint(checkpoint, accelerator.process_index)
    ckpt.load_trainable_state(state.modules, tensors)
    state.load_state_dict(saved)
    if state.ema is not None:
        state.ema.load_state_dict(ckpt.read_ema(checkpoint))
    if rng is not None:
        ckpt.set_rng_state(rng)
    accelerator.print(f"resumed from {checkpoint} at step {state.progress.step}")


def _setup_output(state: TrainState) -> None:
    """The output folder (main process): metrics after the resumed step dropped, the run file saved
    for `crepa sample`, trackers started."""
    accelerator, config = state.accelerator, state.config
    if accelerator.is_main_process:
        config.output.dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(state.metrics_log, state.progress.step)
        atomic_write_json(config.output.dir / RUN_CONFIG_FILE, json.loads(config.model_dump_json()))
        accelerator.init_trackers("crepa", config=_flat_hparams(config))


def startup_summary(config: RunConfig) -> str:
    """The trainer options of the run, one ``key=value`` each, printed when training starts."""
    train, ema = config.train, config.ema
    options = {
        "data.caption_dropout": config.data.caption_dropout,
        "train.timestep_sampling": train.timestep_sampling,
        "train.shift": train.shift,
        "train.loss_weighting": train.loss_weighting,
        "lora.variant": config.lora.variant if config.lora.enabled else "(full fine-tuning)",
        "ema.enabled": ema.enabled,
    }
    if train.timestep_sampling == "mode":
        options["train.mode_scale"] = train.mode_scale
    if train.loss_weighting == "min_snr":
        options["train.snr_gamma"] = train.snr_gamma
    if ema.enabled:
        options |= {
            "ema.decay": ema.decay,
            "ema.update_every": ema.update_every,
            "ema.start_step": ema.start_step,
            "ema.device": ema.device,
            "ema.validate": ema.validate_with_ema,
        }
    return "trainer options: " + "  ".join(f"{key}={value}" for key, value in options.items())


def _setup_data(state: TrainState, dataset: CachedDataset):
    """The batch loader from the resumed position of the bucketed batch order."""
    accelerator, train = state.accelerator, state.config.train
    sources = state.config.data.dataset_sources()
    order = BucketedBatchOrder(
        dataset.buckets,
        train.batch_size,
        train.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        repeats=[sources[entry.source].repeats for entry in dataset.entries],
    )
    if accelerator.is_main_process and state.config.data.sources:
        paths, repeats = [s.path for s in sources], [s.repeats for s in sources]
        accelerator.print(source_shares_report(paths, repeats, [entry.source for entry in dataset.entries]))
    workers = train.num_workers
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    pin_memory = accelerator.device.type == "cuda"
    dropout = None
    if state.config.data.caption_dropout > 0:
        dropout = CaptionDropout(
            state.config.data.caption_dropout, dataset.null_text(), train.seed, accelerator.process_index
        )
    return batch_loader(dataset, order, state.progress.position, workers, pin_memory, dropout)


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
