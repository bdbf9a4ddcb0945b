"""The memory options of ``[model]`` applied to a loaded transformer: which blocks recompute their
activations in backward and where they keep their inputs, which frozen weights are stored in fp8,
which blocks live in CPU memory.

They use diffusers' own machinery where it fits training: the transformer's gradient-checkpointing
hook (with a function that checkpoints only the chosen blocks, optionally keeping their inputs on the
CPU) and layerwise casting (``apply_layerwise_casting``: storage fp8, compute bf16). Block offloading
is crepa's own (:func:`offload_blocks` says why).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from diffusers.hooks import apply_layerwise_casting
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from crepa.models.registry import ModelFamily

FP8_STORAGE = torch.float8_e4m3fn
# Layers layerwise casting leaves in the compute dtype: LoRA adapters (trained in fp32) and the
# small, precision-sensitive layers diffusers itself skips (embeddings, norms, input/output projections).
FP8_SKIP_PATTERNS = ("lora_", "pos_embed", "patch_embed", "norm", r"^proj_in$", r"^proj_out$")


def checkpointed_count(setting: bool | int, depth: int) -> int:
    """How many of ``depth`` blocks ``model.gradient_checkpointing`` checkpoints (true: all)."""
    if setting is True:
        return depth
    return min(int(setting), depth)


def _checkpoint_chosen(
    chosen: frozenset[int], inputs_to: torch.device | None, block: nn.Module, *args, **kwargs
):
    """diffusers' gradient-checkpointing call: recompute ``block`` in backward only if it is chosen.

    ``inputs_to``: where a checkpointed block keeps its hidden-state inputs (the tensors that require
    grad) until backward, e.g. the CPU; they are copied back to their device when the block runs.
    Both copies are non-blocking (a GPU tensor copied to the CPU that way lands in pinned memory):
    they queue on the compute stream, in order with the kernels that make and use the inputs, and the
    host never waits for them (nothing on the host reads the copies).

    The recompute runs whole blocks (early stop off): by default it stops once it has recomputed the
    last tensor backward needs, skipping the block's tail, and with it the block's forward hooks,
    which block offload relies on (:meth:`BlockStreamer.leave` puts the hosted weights back in the
    block's modules; skipped, every offloaded block's device copy would stay until the next step)."""
    if id(block) not in chosen:
        return block(*args, **kwargs)
    if inputs_to is None:
        with set_checkpoint_early_stop(False):  # read when the forward runs, kept for its recompute
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
    devices = [arg.device if isinstance(arg, torch.Tensor) else None for arg in args]
    kept = [
        arg.to(inputs_to, non_blocking=True) if isinstance(arg, torch.Tensor) and arg.requires_grad else arg
        for arg in args
    ]

    def run(*kept_args):
        moved = [
            arg.to(device, non_blocking=True) if isinstance(arg, torch.Tensor) else arg
            for arg, device in zip(kept_args, devices, strict=True)
        ]
        return block(*moved, **kwargs)

    with set_checkpoint_early_stop(False):
        return checkpoint(run, *kept, use_reentrant=False)


def set_gradient_checkpointing(
    transformer: nn.Module, family: ModelFamily, setting: bool | int, inputs_to: torch.device | None = None
) -> None:
    """Checkpoint the first N blocks (execution order; true: all, false / 0: none). The block
    activations of the others stay in memory: faster, as they are not recomputed in backward.
    ``inputs_to``: a device (the CPU) where checkpointed blocks keep their inputs until backward."""
    blocks = family.blocks(transformer)
    count = checkpointed_count(setting, len(blocks))
    if count == 0:
        if getattr(transformer, "is_gradient_checkpointing", False):
            transformer.disable_gradient_checkpointing()
        return
    chosen = frozenset(id(block) for block in blocks[:count])
    transformer.enable_gradient_checkpointing(partial(_checkpoint_chosen, chosen, inputs_to))


def fp8_skip_patterns(transformer: nn.Module) -> tuple[str, ...]:
    """Module-name patterns fp8 storage leaves alone: :data:`FP8_SKIP_PATTERNS` and the model's own."""
    return FP8_SKIP_PATTERNS + tuple(getattr(transformer, "_skip_layerwise_casting_patterns", None) or ())


def store_in_fp8(transformer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Frozen weights stored in fp8 (e4m3), cast to ``compute_dtype`` layer by layer when each layer
    runs; LoRA (fp32) and the layers diffusers keeps precise stay as they are."""
    apply_layerwise_casting(
        transformer,
        storage_dtype=FP8_STORAGE,
        compute_dtype=compute_dtype,
        skip_modules_pattern=fp8_skip_patterns(transformer),
    )


def offload_blocks(
    transformer: nn.Module, family: ModelFamily, count: int, device: torch.device
) -> BlockStreamer:
    """Keep the frozen weights of the first ``count`` blocks in (pinned) CPU memory and stream each
    block's in when it runs (:class:`BlockStreamer`); everything else (trainables such as LoRA
    included) moves to ``device``. Offloaded blocks must be checkpointed: autograd keeps the weights a
    block used until its backward, and only a recomputed block lets them go. The transformer keeps
    the streamer (:func:`block_streamer`): what moves models, e.g. a pipeline's ``.to``, must leave it
    alone, or every hosted block would be copied to ``device`` at once.

    Written here rather than with diffusers' group offloading, which is built for inference: it moves
    every parameter of a block, LoRA too (whose gradients then arrive on the GPU for a parameter on the
    CPU, and whose updates a later copy from its pinned snapshot would discard), it synchronises the
    host after each block, and its prefetch follows the forward order only, while a training step
    also recomputes the blocks in reverse."""
    blocks = family.blocks(transformer)[:count]
    streamer = BlockStreamer(blocks, device)
    hosted = {id(p) for params in streamer.params for p in params}
    for param in transformer.parameters():
        if id(param) not in hosted:
            param.data = param.data.to(device)
    for module in transformer.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(partial(streamer.enter, index))
        block.register_forward_hook(partial(streamer.leave, index))
    setattr(transformer, _STREAMER, streamer)
    return streamer


_STREAMER = "crepa_block_streamer"


def block_streamer(transformer: nn.Module) -> BlockStreamer | None:
    """The streamer :func:`offload_blocks` placed ``transformer`` with; None if it was not offloaded."""
    return getattr(transformer, _STREAMER, None)


class BlockStreamer:
    """The frozen weights of the offloaded blocks (``params``: their parameters, stored on the CPU,
    pinned when ``device`` is a GPU) and their copies that stream to ``device`` one block ahead of
    the block that runs.

    While a block runs, its modules hold parameters wrapping the device copies in place of the hosted
    ones (whose storage never changes). Swapped, not pointed elsewhere with ``param.data``: autograd
    keeps some weights a block used (a norm's, a scale's) as the very parameter tensor, and a recomputed
    block's must still be the device copies when its backward runs after the block has left.

    While block i runs, the copy of the block that runs next goes on a side stream: i + 1 in a forward
    pass, i - 1 in the backward's recompute (which visits the checkpointed blocks in reverse). The
    compute stream waits for a block's copy only when the block starts, so a copy hides behind the
    previous block's compute; at most two blocks' weights are on the device at once (the plan counts
    two, :func:`crepa.plan.memory.estimate`). On the CPU there is no stream: copies are made when
    needed."""

    def __init__(self, blocks: list[nn.Module], device: torch.device) -> None:
        pin = device.type == "cuda"
        # per block: (module, name) of each frozen parameter, in the order of block.parameters()
        self.slots = [
            [
                (module, name)
                for module in block.modules()
                for name, param in module.named_parameters(recurse=False)
                if not param.requires_grad
            ]
            for block in blocks
        ]
        self.params: list[list[nn.Parameter]] = [
            [getattr(module, name) for module, name in slots] for slots in self.slots
        ]
        for param in (p for params in self.params for p in params):
            param.data = param.data.to("cpu").pin_memory() if pin else param.data.to("cpu")
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if pin else None
        # block index -> its weights on the device and the event their copy records
        self.in_flight: dict[int, tuple[list[nn.Parameter], torch.cuda.Event | None]] = {}

    def _copies(self, index: int) -> list[nn.Parameter]:
        """Block ``index``'s weights copied to the device (a real copy on the CPU too)."""
        return [
            nn.Parameter(p.to(self.device, non_blocking=True, copy=True), requires_grad=False)
            for p in self.params[index]
        ]

    def prefetch(self, index: int) -> None:
        """Start copying block ``index``'s weights to the device (on the side stream), unless under way."""
        if index in self.in_flight or not 0 <= index < len(self.params):
            return
        if self.copy_stream is None:
            self.in_flight[index] = (self._copies(index), None)
            return
        with torch.cuda.stream(self.copy_stream):
            self.in_flight[index] = (self._copies(index), self.copy_stream.record_event())

    def enter(self, index: int, *_: object) -> None:
        """Block pre-hook: its weights onto the device (waited for on the compute stream) and into its
        modules; next block's copy started."""
        self.prefetch(index)
        copies, copied = self.in_flight.pop(index)
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for copy in copies:  # made on the side stream, used and freed on this one
                copy.record_stream(compute)
        for (module, name), copy in zip(self.slots[index], copies, strict=True):
            setattr(module, name, copy)
        # The autograd engine runs a graph task only during backward: there, the checkpointed blocks
        # recompute from the last one down. (torch.utils.checkpoint asks the same private function.)
        in_backward = torch._C._current_graph_task_id() != -1
        self.prefetch(index - 1 if in_backward else index + 1)

    def leave(self, index: int, *_: object) -> None:
        """Block post-hook: its modules hold the hosted parameters again; the device copies live on
        only while autograd keeps them for the block's backward."""
        for (module, name), param in zip(self.slots[index], self.params[index], strict=True):
            setattr(module, name, param)


BasePrecision = Literal["bf16", "fp8"]


def apply_memory_options(
    transformer: nn.Module,
    family: ModelFamily,
    gradient_checkpointing: bool | int = True,
    base_precision: BasePrecision = "bf16",
    offload: int = 0,
    offload_activations: bool = False,
    device: torch.device | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Apply ``model.gradient_checkpointing``, ``model.offload_activations``, ``model.base_precision`` and
    ``model.offload_blocks`` to a loaded transformer (LoRA already added, trainables already fp32), as
    ``crepa train`` does. ``device``: where it trains (with ``offload``, this places the model: the
    offloaded blocks stay on the CPU, the rest moves to ``device``); ``compute_dtype``: the dtype the
    frozen weights compute in (the weights' dtype before fp8)."""
    device = device or torch.device("cpu")
    host = torch.device("cpu") if offload_activations and device.type == "cuda" else None
    set_gradient_checkpointing(transformer, family, gradient_checkpointing, host)
    if base_precision == "fp8":
        store_in_fp8(transformer, compute_dtype)
    if offload:
        offload_blocks(transformer, family, offload, device)
