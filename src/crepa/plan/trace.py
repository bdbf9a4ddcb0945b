"""Running a transformer without memory: fake tensors (shapes, dtypes and autograd, no data) and a
counter of the bytes their storages would take.

The memory model (:mod:`crepa.plan.memory`) profiles one block with these tools and composes the
step from it; the validation measures a whole step with them. CPU autocast (bf16) stands in for CUDA
autocast: matmuls, linears and attention run in bf16 alike; CUDA's autocast also runs layer norms in
fp32, which the CPU one does not.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from crepa.config import LoraSection
from crepa.models.conditioning import text_width, transformer_inputs
from crepa.models.memory import set_gradient_checkpointing, store_in_fp8
from crepa.models.registry import ModelFamily, detect_family, latent_channels
from crepa.regularizer import CrepaConfig, CrepaRegularizer
from crepa.repvideo import install_repvideo


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU flash-attention kernel the fake tensors dispatch to
    (with torch's own attention formulas, as for the CUDA kernels)."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
        },
    )


class AllocationCounter(TorchDispatchMode):
    """Live and peak bytes of every tensor storage created while the mode is on, freed when Python
    frees the storage: what a caching allocator would hand out, without fragmentation.

    Tensors created before the mode (weights, inputs) count once :meth:`add` is called on them."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return  # meta stands for host memory in the traces (offloaded activations)
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.add(tensor)
        return out


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def _fake_like(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=dtype)


def make_fake(modules: list[nn.Module], mode: FakeTensorMode) -> None:
    """Replace the parameters and buffers of ``modules`` (meta or real) by fake CPU tensors of the same
    shape; trainable parameters in fp32, as training keeps them."""
    with mode:
        for module in (sub for root in modules for sub in root.modules()):
            for name, param in module._parameters.items():
                if param is not None:
                    stored = torch.float32 if param.requires_grad else param.dtype
                    module._parameters[name] = nn.Parameter(
                        _fake_like(param, stored), requires_grad=param.requires_grad
                    )
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = _fake_like(buffer, buffer.dtype)


def fake_transformer(
    class_name: str,
    config: Mapping[str, Any],
    mode: FakeTensorMode,
    lora: LoraSection | None,
    crepa: CrepaConfig | None = None,
    teacher_dim: int = 1536,
    gradient_checkpointing: bool | int = False,
    offload_activations: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[nn.Module, ModelFamily, CrepaRegularizer | None]:
    """The diffusers transformer ``class_name(**config)`` with fake CPU weights in ``dtype``; with
    ``lora``, the family's LoRA added (else every weight trains); ``gradient_checkpointing`` as
    ``model.gradient_checkpointing`` (``offload_activations``: checkpointed blocks keep their inputs
    on the meta device, which stands for host memory: the counter skips it); with ``crepa``, the CREPA regularizer installed (after the
    checkpointing, as in training: it recomputes its head when blocks are recomputed). Trainable
    parameters are fp32, as training keeps them."""
    with torch.device("meta"):
        transformer = getattr(diffusers, class_name).from_config(dict(config))
        nn.Module.to(transformer, dtype)  # ModelMixin.to would warn about the fp32 modules kept below
        keep_fp32 = getattr(transformer, "_keep_in_fp32_modules", None) or []
        for name, param in transformer.named_parameters():  # as from_pretrained(torch_dtype=...) keeps them
            if any(module in name.split(".") for module in keep_fp32):
                param.data = param.data.float()
        family = detect_family(transformer)
        if lora is not None:
            from crepa.train.lora import add_lora

            add_lora(transformer, family, lora)
        else:
            transformer.requires_grad_(True)
        inputs_to = torch.device("meta") if offload_activations else None
        set_gradient_checkpointing(transformer, family, gradient_checkpointing, inputs_to)
        regularizer = None
        if crepa is not None:
            external = crepa.mode != "backbone"
            regularizer = CrepaRegularizer(transformer, crepa, teacher_dim=teacher_dim if external else None)
    make_fake([transformer, *([regularizer] if regularizer is not None else [])], mode)
    transformer.train()
    return transformer, family, regularizer


def fake_step_inputs(
    transformer: nn.Module,
    family: ModelFamily,
    mode: FakeTensorMode,
    latent_shape: tuple[int, int, int, int, int],
    text_length: int,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    """Forward kwargs of a batch of latents (B, C, F, H, W) with ``text_length`` text tokens (and the
    first-frame inputs of image-to-video families), as fake tensors."""
    config = transformer.config
    batch, _, _, height, width = latent_shape
    with mode:
        latents = torch.empty(latent_shape, dtype=dtype)
        text = {
            "prompt_embeds": torch.empty(batch, text_length, text_width(config), dtype=dtype),
            "prompt_attention_mask": torch.ones(batch, text_length, dtype=torch.bool),
        }
        if config.get("pooled_projection_dim"):
            text["pooled_prompt_embeds"] = torch.empty(batch, config["pooled_projection_dim"], dtype=dtype)
        image: dict[str, torch.Tensor] = {}
        if family.name == "cogvideox_i2v":
            image = {
                "image_latents": torch.empty(batch, latent_channels(config), 1, height, width, dtype=dtype)
            }
        elif family.name == "wan_i2v":
            image = {"condition_latents": torch.empty(latent_shape, dtype=dtype)}
            if config.get("image_dim"):
                image["image_embeds"] = torch.empty(batch, 257, config["image_dim"], dtype=dtype)
        return transformer_inputs(
            transformer, family, latents, torch.full((batch,), 500.0), text, guidance=6.0, image=image
        )


@contextmanager
def convertible_fake_modules() -> Iterator[None]:
    """Let ``module.to(dtype)`` convert fake parameters (diffusers' layerwise casting does it at every
    forward). ``nn.Module._apply`` swaps fake parameters with ``torch.utils.swap_tensors``, which refuses
    tensors the fake mode holds weak references to; inside this block the swap sets ``.data`` instead,
    which is what ``_apply`` does for real tensors."""

    def set_data(first: torch.Tensor, second: torch.Tensor) -> None:
        first.data = second

    original = torch.utils.swap_tensors
    torch.utils.swap_tensors = set_data
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


class _MasksAllOnes(TorchDispatchMode):
    """``nonzero`` as if every element were nonzero: its output size depends on data fake tensors do not
    have (Mochi packs its text tokens with ``nonzero(mask)``; the masks of a full-length prompt are all
    ones)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default:
            (tensor,) = args
            return torch.empty(tensor.numel(), tensor.dim(), dtype=torch.long)
        return func(*args, **(kwargs or {}))


@contextmanager
def fake_forward() -> Iterator[None]:
    """A training forward on fake CPU tensors: under bf16 autocast, as training runs on the GPU, with
    all-ones masks for data-dependent shapes.

    Mochi's rotary embedding asks for fp32 autocast around fp32 inputs; CPU autocast turns itself off
    there instead, with a warning, and computes the same fp32 as the GPU: the warning says nothing
    about the plan and is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="In CPU autocast, but the target dtype is not supported", category=UserWarning
        )
        with torch.autocast("cpu", dtype=torch.bfloat16), _MasksAllOnes():
            yield


@dataclass(frozen=True)
class ComponentProfile:
    """Bytes and FLOPs of one call of a component (a block, the CREPA head) in training.

    saved: what autograd keeps from its forward for its backward (beyond inputs and outputs);
    output: its outputs; backward_peak: the most its backward holds at once beyond ``saved``, the
    outputs' gradients included; forward_flops: matmul and attention FLOPs of the forward.
    """

    saved: int
    output: int
    backward_peak: int
    forward_flops: int
    backward_flops: int


def profile_call(call: Callable[[], Any], counter_inputs: list[torch.Tensor]) -> ComponentProfile:
    """Run ``call`` forward and backward (from a gradient on every floating output) and count.

    ``counter_inputs``: tensors alive before the call (counted as already there)."""
    counter = AllocationCounter()
    for tensor in counter_inputs:
        counter.add(tensor)
    before = counter.current
    forward_flops = flop_counter()
    with counter, forward_flops:
        outputs = [t for t in tree_flatten(call())[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    output_bytes = storage_bytes(outputs)
    saved = counter.current - before - output_bytes
    backward_flops = flop_counter()
    with counter:
        grads = [torch.empty_like(t) for t in outputs]
        counter.reset_peak()
        holding = counter.current
        with backward_flops, _MasksAllOnes():  # a checkpointed block runs its forward again here
            torch.autograd.backward(outputs, grads)
    backward_peak = counter.peak - holding + storage_bytes(grads)
    return ComponentProfile(
        saved, output_bytes, backward_peak, forward_flops.get_total_flops(), backward_flops.get_total_flops()
    )


def measure_step_peak(
    class_name: str,
    config: Mapping[str, Any],
    latent_shape: tuple[int, int, int, int, int],
    text_length: int,
    lora: LoraSection | None,
    crepa: CrepaConfig | None = None,
    teacher_dim: int = 1536,
    gradient_checkpointing: bool | int = True,
    base_precision: str = "bf16",
    offload_activations: bool = False,
    repvideo_window: int | None = None,
) -> int:
    """Peak bytes of the second of two real training steps (forward, diffusion + CREPA loss, backward,
    AdamW step) on fake tensors, everything counted: weights, trainables, gradients, optimiser state,
    activations. The measurement the memory model is validated against on the CPU."""
    mode = FakeTensorMode()
    transformer, family, regularizer = fake_transformer(
        class_name, config, mode, lora, crepa, teacher_dim, gradient_checkpointing, offload_activations
    )
    inputs = fake_step_inputs(transformer, family, mode, latent_shape, text_length)
    trainables = [p for p in transformer.parameters() if p.requires_grad]
    if repvideo_window is not None:
        gates = install_repvideo(transformer, repvideo_window, gate_init=0.5)
        make_fake([gates], mode)
        trainables += list(gates.parameters())
    if regularizer is not None:
        trainables += list(regularizer.projector.parameters())
    counter = AllocationCounter()
    for tensor in [*transformer.parameters(), *transformer.buffers(), *trainables, *tree_flatten(inputs)[0]]:
        counter.add(tensor)
    with mode, convertible_fake_modules():
        if base_precision == "fp8":
            store_in_fp8(transformer)
        optimizer = torch.optim.AdamW(trainables)
        teacher = None
        if regularizer is not None:
            patches = family.patch_sizes(transformer)
            grid = [size // patch for size, patch in zip(latent_shape[2:], patches, strict=True)]
            teacher = torch.empty(latent_shape[0], *grid, teacher_dim, dtype=torch.float16)
            counter.add(teacher)
        for step in range(2):
            if step == 1:
                counter.reset_peak()
            with counter:
                with fake_forward():
                    prediction = transformer(**inputs)[0]
                loss = prediction.float().square().mean()  # the diffusion loss's fp32 copy of the prediction
                if regularizer is not None:
                    with fake_forward():
                        loss = loss + regularizer.loss(teacher, step=step).loss
                with _MasksAllOnes():  # checkpointed blocks run their forward again here
                    loss.backward()
                del prediction, loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return counter.peak
