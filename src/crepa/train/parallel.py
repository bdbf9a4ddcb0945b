"""How training is spread over processes: one process, data parallel (DDP through accelerate) or
sharded (FSDP2: ``torch.distributed.fsdp.fully_shard`` on every transformer block, LoRA and frozen
weights together).

The launcher says which: ``accelerate launch --config_file examples/accelerate/fsdp.yaml`` sets
``ACCELERATE_USE_FSDP``. crepa applies ``fully_shard`` itself rather than through accelerate's
plugin, because the plugin only acts on GPUs (on a CPU machine accelerate falls back to plain
data parallelism) and it would leave the projector and RepVideo gates, which live outside the
transformer, out of the prepared model. Those small modules stay replicated on every rank and
their gradients are averaged by :func:`average_gradients` (one all-reduce).

Everything that must see whole tensors goes through :func:`full_tensor` (a collective for sharded
parameters: every rank calls it), so checkpoints and the saved LoRA hold whole tensors and a run
can resume with another number of processes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from crepa.config import ConfigError, RunConfig
from crepa.models import ModelFamily

Sharding = Literal["none", "fsdp"]


def launch_sharding(config: RunConfig) -> Sharding:
    """The sharding the launcher asked for; DeepSpeed and FSDP with fp16 are refused (no weights loaded yet)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(
            "DeepSpeed is not supported by crepa train: launch with FSDP2 instead "
            "(accelerate launch --config_file examples/accelerate/fsdp.yaml -m crepa train RUN.toml), "
            "which shards the transformer blocks like ZeRO-3"
        )
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if config.model.offload_blocks and not fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "model.offload_blocks: block offload under DDP is not supported (DDP wraps a model whose "
            "weights all live on its GPU); set model.offload_blocks = 0, launch one process, or launch "
            "with FSDP2, which spreads the weights over the GPUs"
        )
    if not fsdp:
        return "none"
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"FSDP version {version} is not supported (FSDP1 rejects blocks that mix frozen and LoRA "
            "weights): set fsdp_version: 2 in the accelerate config (see examples/accelerate/fsdp.yaml)"
        )
    check_fsdp_run(config)
    if config.model.offload_blocks:
        raise ConfigError(
            "model.offload_blocks: block offload under FSDP is not supported (FSDP already spreads the "
            "weights over the GPUs); set model.offload_blocks = 0, or launch one process"
        )
    if config.model.base_precision == "fp8":
        raise ConfigError(
            "model.base_precision: 'fp8' under FSDP is not supported (layerwise casting replaces the sharded "
            "weights); use model.base_precision = 'bf16', or launch on one GPU / with DDP"
        )
    return "fsdp"


def check_fsdp_run(config: RunConfig) -> None:
    """Refuse (:class:`ConfigError`) what FSDP2 cannot train and no memory setting changes: full
    fine-tuning and fp16. (fp8 and block offload, which the memory settings choose, are checked by
    :func:`launch_sharding`.)"""
    if not config.lora.enabled:
        raise ConfigError(
            "lora.enabled = false: full fine-tuning under FSDP is not supported yet (the whole "
            "transformer cannot be saved from shards); train a LoRA or launch with DDP"
        )
    if config.train.mixed_precision == "fp16" or config.model.dtype == "fp16":
        raise ConfigError(
            "train.mixed_precision / model.dtype: fp16 with FSDP needs a sharded gradient scaler, which "
            "crepa does not run; use bf16"
        )


def shard_transformer(transformer: nn.Module, family: ModelFamily) -> None:
    """FSDP2 in place: each block is one unit (gathered for its forward / backward), the rest the root's."""
    from torch.distributed.fsdp import fully_shard

    for block in family.blocks(transformer):
        fully_shard(block)
    fully_shard(transformer)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (FSDP2) tensor, sharing its storage; other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (collective: every rank must call); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into ``param``, sharded (this rank's shard of it) or not."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full.to(param.device, param.dtype))


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated ``params`` over the processes in one all-reduce.

    A parameter without a gradient on this rank contributes zeros, so every rank issues the same
    collective every step whatever its local graph held.
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for param, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
        param.grad = chunk.view_as(param).to(param.dtype)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the global L2 norm over all ranks and return it (a 0-d fp32 tensor, no host sync).

    Sharded gradients contribute their local shards' squares, summed over the processes (one
    all-reduce); replicated gradients are equal on every rank and count once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    device = (sharded or replicated)[0].device
    squares = torch.zeros((), device=device)
    if sharded:
        squares = squares + torch.stack([g.float().pow(2).sum() for g in sharded]).sum()
        torch.distributed.all_reduce(squares)
    if replicated:
        squares = squares + torch.stack([g.float().pow(2).sum() for g in replicated]).sum()
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in sharded + replicated:
        grad.mul_(scale.to(grad.dtype))
    return norm


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """The optimiser's state dict with parameters named (``names``: id(param) -> name) and whole
    tensors (collective for sharded parameters), so it loads into any number of processes."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    by_name = {}
    for index, entry in state["state"].items():
        by_name[names[id(params[index])]] = {
            key: full_tensor(value).cpu() if isinstance(value, torch.Tensor) and value.ndim else value
            for key, value in entry.items()
        }
    groups = [
        {**group, "params": [names[id(params[i])] for i in group["params"]]}
        for group in state["param_groups"]
    ]
    return {"state": by_name, "param_groups": groups}


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, saved: dict, names: dict[int, str]
) -> None:
    """Inverse of :func:`optimizer_state_by_name`: each rank takes its shard of the whole tensors."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index_of = {names[id(param)]: index for index, param in enumerate(params)}
    missing = [name for group in saved["param_groups"] for name in group["params"] if name not in index_of]
    if missing:
        raise KeyError(
            f"the checkpoint's optimiser state has parameters this run does not train: {missing[:3]}"
        )
    state = {}
    for name, entry in saved["state"].items():
        param = params[index_of[name]]
        state[index_of[name]] = {
            key: _like(param, value) if isinstance(value, torch.Tensor) and value.ndim else value
            for key, value in entry.items()
        }
    groups = [{**group, "params": [index_of[n] for n in group["params"]]} for group in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    return full.to(param.device)


def exchange_objects(value: object) -> list:
    """Every rank's JSON-serialisable ``value``, in rank order, through the process group's store:
    no collective, so no gloo work holding Python tensors is left behind (see :func:`exit_process`)."""
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    store.set(f"crepa/exchange/{rank}", json.dumps(value))
    return [json.loads(store.get(f"crepa/exchange/{other}")) for other in range(world)]


def exit_process(code: int) -> None:
    """End a process of a multi-process run now, skipping the interpreter's teardown.

    Why: gloo's ``~ProcessGroupGloo`` joins its worker threads while the tearing-down thread holds
    the GIL, and a worker that is still releasing a finished collective's tensors needs the GIL to
    drop their Python objects: the process hangs in a futex after "done" (seen under load, where the
    worker lags behind). Everything a run writes is flushed and closed by then, so exiting without
    destructors loses nothing. A single process returns and exits normally.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
