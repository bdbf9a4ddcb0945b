"""Peak GPU memory and FLOPs of one training step, predicted from the transformer config.

The model is built with fake weights (:mod:`crepa.plan.trace`); the first block of each block list
is run forward and backward once at the real token count, with and without fp8 weights, which
gives what one block keeps for backward, its output and its backward working set. A step is then
composed, per process:

    weights (storage dtype; offloaded blocks off the GPU; sharded over FSDP ranks)
    + trainables in fp32, their gradients and the optimiser state (AdamW 8 bytes / parameter,
      8-bit AdamW 2)
    + every block's input (what a checkpointed block keeps) + what each non-checkpointed block saves,
      released block by block as backward runs from the last block down, plus the working set of the
      block in backward (its recomputed activations if checkpointed, its backward's own tensors)
    + the CREPA head's and the online teacher's share.

FLOPs: the forward counted by torch's FlopCounterMode on the fake model, the backward as counted on
the profiled blocks, plus one more forward of every checkpointed block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from crepa.config import AlignmentSection, LoraSection
from crepa.models.memory import FP8_STORAGE, store_in_fp8
from crepa.plan.trace import (
    ComponentProfile,
    convertible_fake_modules,
    fake_forward,
    fake_step_inputs,
    fake_transformer,
    flop_counter,
    profile_call,
    storage_bytes,
)

GIB = 2**30
OptimizerName = Literal["adamw", "adamw8bit"]
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # state bytes per trainable parameter (two moments)
# Step-time constants (one H200; docs/benchmarks.md, "Memory options and `crepa plan`"): 341 TFLOP/s
# of work done by the CogVideoX-5B LoRA step, host-to-device copies from pinned memory, and HBM
# bandwidth for fp8 -> bf16 casts.
ACHIEVED_FLOPS = 341e12
PCIE_BYTES_PER_S = 25e9
HBM_BYTES_PER_S = 4.0e12
# CUDA autocast runs layer norms (and a few other ops) in fp32, which CPU autocast, and so the fake-tensor
# trace, does not: the one GPU measurement (H200, CogVideoX-5B LoRA, every block checkpointed)
# kept 8.97 GiB of activations and gradients where the trace counts 6.75 GiB. Fits on a GPU are judged
# with the activations scaled by that ratio.
CUDA_ACTIVATION_FACTOR = 8.97 / 6.75


@dataclass(frozen=True)
class Workload:
    """What a run trains: the transformer config, one batch of latents (B, C, F, H, W), the text
    length, LoRA (None: full fine-tuning), CREPA (None: off) and its teacher width, RepVideo."""

    class_name: str
    config: Mapping[str, Any]
    latent_shape: tuple[int, int, int, int, int]
    text_length: int
    lora: LoraSection | None = field(default_factory=LoraSection)
    crepa: AlignmentSection | None = None
    teacher_dim: int = 1536
    teacher_params: int = 0  # an online teacher's parameters (fp16 on the GPU), 0 when grids are cached
    teacher_activation: int = 0  # bytes one chunk of online teacher frames takes
    repvideo_window: int | None = None  # RepVideo installed with this window (None: off)


@dataclass(frozen=True)
class Settings:
    """The memory options the planner chooses among (``model.*`` / ``optim.name``)."""

    checkpointed_blocks: int
    offload_blocks: int = 0
    base_precision: Literal["bf16", "fp8"] = "bf16"
    optimizer: OptimizerName = "adamw"
    offload_activations: bool = False

    def set_lines(self, depth: int) -> list[str]:
        """The ``--set`` overrides of ``crepa train`` that select these settings."""
        checkpointing = {0: "false", depth: "true"}.get(
            self.checkpointed_blocks, str(self.checkpointed_blocks)
        )
        return [
            f"model.gradient_checkpointing={checkpointing}",
            f"model.offload_blocks={self.offload_blocks}",
            f'model.base_precision="{self.base_precision}"',
            f'optim.name="{self.optimizer}"',
            f"model.offload_activations={str(self.offload_activations).lower()}",
        ]


@dataclass(frozen=True)
class BlockKind:
    """One block list's blocks: how many, and one block's profile and weights."""

    count: int
    profile: ComponentProfile
    profile_fp8: ComponentProfile
    weight_bytes: int  # one block's frozen weights (bf16, the few fp32 modules diffusers keeps in fp32)
    castable_params: int  # of which fp8 storage applies to this many parameters


@dataclass(frozen=True)
class ModelProfile:
    """Everything the composition needs, independent of the settings."""

    blocks: tuple[BlockKind, ...]
    frozen_bytes: int  # all frozen weights (bf16, fp32 where diffusers keeps modules in fp32)
    castable_params: int  # frozen parameters fp8 storage applies to
    trainable_params: int  # the transformer's (LoRA or all)
    side_params: int  # CREPA projector (replicated, never sharded)
    head: ComponentProfile | None
    io_bytes: int  # the step's inputs and the prediction
    forward_flops: int
    full_finetune: bool

    @property
    def depth(self) -> int:
        return sum(kind.count for kind in self.blocks)

    def block_sequence(self) -> list[BlockKind]:
        return [kind for kind in self.blocks for _ in range(kind.count)]


@dataclass(frozen=True)
class Estimate:
    """Predicted peak bytes per process, by part, and the step's FLOPs and time."""

    settings: Settings
    weights: int
    trainable_state: int
    activations: int
    teacher: int
    step_flops: float
    seconds: float

    @property
    def peak(self) -> int:
        return self.weights + self.trainable_state + self.activations + self.teacher

    @property
    def gpu_peak(self) -> int:
        """The peak on a CUDA GPU: activations scaled by :data:`CUDA_ACTIVATION_FACTOR`."""
        return self.peak + int(self.activations * (CUDA_ACTIVATION_FACTOR - 1))


def _grad_copies(args: tuple, kwargs: dict, output_shapes: set[tuple[int, ...]]) -> tuple[tuple, dict]:
    """The block's inputs with the hidden states (those shaped like an output) requiring grad, as
    they do in training (they come out of the previous trainable block)."""

    def prepare(value):
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and tuple(value.shape) in output_shapes
        ):
            return value.detach().requires_grad_(True)
        return value

    return tuple(prepare(a) for a in args), {k: prepare(v) for k, v in kwargs.items()}


def _tensors(*values) -> list[torch.Tensor]:
    return [t for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


def _profile_block(block: nn.Module, args: tuple, kwargs: dict) -> ComponentProfile:
    with torch.no_grad(), fake_forward():
        outputs = _tensors(block(*args, **kwargs))
    args, kwargs = _grad_copies(args, kwargs, {tuple(t.shape) for t in outputs})

    def call():
        with fake_forward():
            return block(*args, **kwargs)

    return profile_call(call, [*_tensors(args, kwargs), *block.parameters(), *block.buffers()])


def profile_model(workload: Workload) -> ModelProfile:
    """Profile ``workload`` on fake tensors (a few seconds on the CPU for a 14 B model)."""
    mode = FakeTensorMode()
    transformer, family, regularizer = fake_transformer(
        workload.class_name, workload.config, mode, workload.lora, workload.crepa, workload.teacher_dim
    )
    inputs = fake_step_inputs(transformer, family, mode, workload.latent_shape, workload.text_length)
    first_blocks = [getattr(transformer, name)[0] for name in family.block_lists]
    calls: dict[int, tuple[tuple, dict]] = {}

    def record(module, args, kwargs):
        calls.setdefault(id(module), (args, kwargs))

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in first_blocks]
    flops = flop_counter()
    with mode, torch.no_grad(), fake_forward(), flops:
        prediction = transformer(**inputs)[0]
    for handle in handles:
        handle.remove()
    if regularizer is not None:
        regularizer.capture.pop()

    # frozen weights' bytes as loaded (bf16, fp32 where diffusers keeps modules in fp32), then which of
    # them fp8 storage takes (applied to the whole model, as training does: patterns match full names)
    frozen = {
        name: param.numel() * param.element_size()
        for name, param in transformer.named_parameters()
        if not param.requires_grad
    }
    kinds = []
    with mode, convertible_fake_modules():
        profiles = [_profile_block(block, *calls[id(block)]) for block in first_blocks]
        store_in_fp8(transformer)
        in_fp8 = {
            name: param.numel()
            for name, param in transformer.named_parameters()
            if param.dtype == FP8_STORAGE
        }
        for name, block, profile in zip(family.block_lists, first_blocks, profiles, strict=True):
            prefix = f"{name}.0."
            kinds.append(
                BlockKind(
                    count=len(getattr(transformer, name)),
                    profile=profile,
                    profile_fp8=_profile_block(block, *calls[id(block)]),
                    weight_bytes=sum(size for child, size in frozen.items() if child.startswith(prefix)),
                    castable_params=sum(n for child, n in in_fp8.items() if child.startswith(prefix)),
                )
            )
        head = None
        if regularizer is not None:
            grid = regularizer.capture.grid_size
            batch = workload.latent_shape[0]
            student = torch.empty(batch, *grid, family.hidden_size(transformer), dtype=torch.bfloat16)
            teacher = torch.empty(batch, *grid, workload.teacher_dim, dtype=torch.float16)
            student.requires_grad_(True)

            def head_call():
                with fake_forward():
                    return regularizer._head(student, teacher)[0]

            head = profile_call(head_call, [student, teacher, *regularizer.parameters()])
    io_bytes = storage_bytes(_tensors(inputs)) + prediction.numel() * 4 * 3
    return ModelProfile(
        blocks=tuple(kinds),
        frozen_bytes=sum(frozen.values()),
        castable_params=sum(in_fp8.values()),
        trainable_params=sum(p.numel() for p in transformer.parameters() if p.requires_grad),
        side_params=0 if regularizer is None else sum(p.numel() for p in regularizer.projector.parameters()),
        head=head,
        io_bytes=io_bytes,
        forward_flops=flops.get_total_flops() + (0 if head is None else head.forward_flops),
        full_finetune=workload.lora is None,
    )


def estimate(profile: ModelProfile, settings: Settings, workload: Workload, gpus: int = 1) -> Estimate:
    """Peak memory per process and step time of ``settings`` (``gpus`` > 1: FSDP over that many)."""
    sequence = profile.block_sequence()
    fp8 = settings.base_precision == "fp8"
    checkpointed = [index < settings.checkpointed_blocks for index in range(len(sequence))]

    # weights
    weights = profile.frozen_bytes - (profile.castable_params if fp8 else 0)
    if settings.offload_blocks:
        offloaded = sequence[: settings.offload_blocks]  # offloaded blocks are checkpointed ones
        stored = [kind.weight_bytes - (kind.castable_params if fp8 else 0) for kind in offloaded]
        weights -= sum(stored) - 2 * max(stored)  # the running block and the one prefetched
    largest_block = max(kind.weight_bytes for kind in profile.blocks)
    if gpus > 1:
        weights = weights // gpus + 2 * largest_block  # the gathered block and the next one

    # trainables: fp32 parameter + fp32 gradient + optimiser state
    per_param = 4 + 4 + OPTIMIZER_BYTES[settings.optimizer]
    trainable_state = profile.trainable_params * per_param // gpus + profile.side_params * (4 + 4 + 8)

    def block_profile(kind: BlockKind) -> ComponentProfile:
        return kind.profile_fp8 if fp8 else kind.profile

    # Backward runs from the last block down: at block j, blocks after j have freed their inputs and
    # saved tensors; a checkpointed block first recomputes its own. (Checkpointing the first N blocks
    # thus recomputes only when the non-checkpointed blocks' activations are gone.)
    # A checkpointed block's input stays on the GPU, or in host memory with offload_activations (copied
    # back for its recompute).
    on_gpu = [not (ckpt and settings.offload_activations) for ckpt in checkpointed]
    held = sum(block_profile(kind).output for kind, kept in zip(sequence, on_gpu, strict=True) if kept)
    held += sum(
        block_profile(kind).saved for kind, ckpt in zip(sequence, checkpointed, strict=True) if not ckpt
    )
    head = profile.head
    peak_activations = 0
    if head is not None:
        held += head.output + (0 if checkpointed[0] else head.saved)
        peak_activations = held + head.backward_peak + (head.saved if checkpointed[0] else 0)
    for kind, ckpt, kept in zip(reversed(sequence), reversed(checkpointed), reversed(on_gpu), strict=True):
        block = block_profile(kind)
        copied_back = 0 if kept else block.output
        working = copied_back + block.backward_peak + (block.saved if ckpt else 0)
        peak_activations = max(peak_activations, held + working)
        held -= (block.output if kept else 0) + (0 if ckpt else block.saved)
    activations = peak_activations + profile.io_bytes
    if workload.repvideo_window is not None:
        # RepVideo keeps its window's cache mean and the mixed input for the gates' backward: about two
        # block outputs when blocks are checkpointed, half an output more per block that is not
        # (measured with crepa.plan.trace on CogVideoX-5B and Wan 14B, window 3, 6 blocks)
        output = max(kind.profile.output for kind in profile.blocks)
        activations += output * 2 + output * checkpointed.count(False) // 2
    teacher = workload.teacher_params * 2 + workload.teacher_activation

    # FLOPs and time
    recompute = sum(
        kind.profile.forward_flops for kind, ckpt in zip(sequence, checkpointed, strict=True) if ckpt
    )
    backward = sum(kind.profile.backward_flops for kind in sequence)
    if head is not None:
        backward += head.backward_flops
    step_flops = float(profile.forward_flops + recompute + backward)
    seconds = step_flops / ACHIEVED_FLOPS
    if fp8:  # every weight use casts fp8 -> bf16 (read 1 byte, write 2): forward, recompute, backward
        uses = 2 + sum(checkpointed) / max(len(sequence), 1)
        seconds += profile.castable_params * 3 * uses / HBM_BYTES_PER_S
    if settings.offload_activations:  # the checkpointed inputs out and back, in line on the compute stream
        moved = sum(
            block_profile(kind).output for kind, kept in zip(sequence, on_gpu, strict=True) if not kept
        )
        seconds += 2 * moved / PCIE_BYTES_PER_S
    if settings.offload_blocks:
        # Each offloaded block's frozen weights are copied in for its forward and again for its
        # recompute, one block ahead on a side stream (crepa.models.memory.BlockStreamer): a copy hides
        # behind the previous block's forward (or recompute and backward); the first of each pass waits.
        copies = [stored_bytes / PCIE_BYTES_PER_S for stored_bytes in stored]
        forward = [kind.profile.forward_flops / ACHIEVED_FLOPS for kind in offloaded]
        backward = [kind.profile.backward_flops / ACHIEVED_FLOPS for kind in offloaded]
        seconds += copies[0] + copies[-1]
        seconds += sum(max(0.0, copy - hide) for copy, hide in zip(copies[1:], forward, strict=False))
        seconds += sum(
            max(0.0, copy - f - b) for copy, f, b in zip(copies[:-1], forward[1:], backward[1:], strict=False)
        )
    return Estimate(settings, weights, trainable_state, activations, teacher, step_flops, seconds)


def candidate_settings(depth: int, single_gpu: bool, repvideo: bool = False) -> list[Settings]:
    """Every combination the planner weighs: any number of checkpointed blocks, offload of none, a
    quarter, half, three quarters or all but two (checkpointed) blocks, bf16 / fp8 weights, AdamW /
    8-bit AdamW, checkpointed inputs on the GPU or in host memory. Under FSDP (not ``single_gpu``)
    only checkpointing and the optimiser: crepa refuses offload and fp8 there; with ``repvideo``,
    inputs on the GPU only (crepa refuses activation offload with RepVideo)."""
    offloads = sorted({0, depth // 4, depth // 2, 3 * depth // 4, max(depth - 2, 0)}) if single_gpu else [0]
    return [
        Settings(checkpointed, offload, precision, optimizer, offload_activations)
        for checkpointed in range(depth + 1)
        for offload in offloads
        if offload <= checkpointed
        for precision in (("bf16", "fp8") if single_gpu else ("bf16",))
        for optimizer in ("adamw", "adamw8bit")
        for offload_activations in (
            (False, True) if checkpointed and single_gpu and not repvideo else (False,)
        )
    ]
