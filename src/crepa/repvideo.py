"""RepVideo: cross-layer feature aggregation with one learnable gate per block, installed with hooks.

A feature cache holds the outputs of the blocks since its last restart. Before block i, the block's
input becomes ``g_i * mean(cache) + (1 - g_i) * h_{i-1}``. The cache starts with the input of block 0
and restarts, holding only the newest output, after every block whose index is a multiple of
``window``. Index 0 is a multiple of every window, so right after a restart the cache holds only
``h_{i-1}`` and the block runs unchanged: blocks 0, 1, window + 1, 2 * window + 1, ... (every block
when ``window == 1``) are never gated.

No diffusers code is edited. A forward pre-hook on each block replaces its ``hidden_states`` argument
(positional or keyword) and a forward hook adds the block's output to one running sum per stream;
the mean is that sum divided by a Python count, so no list of activations is kept.

Gradient checkpointing (diffusers' non-reentrant checkpoint) re-runs each block, pre-hook included,
during backward, when the running sum has long moved on. So every gated block of a forward with
grad enabled records *weak* references to the cache tensors it averaged. They are block outputs, which
the checkpoint keeps alive as the inputs of the following blocks until backward has passed them:
the recomputation rebuilds the same sum in the same order (identical input, identical gradients),
the records cost no memory, and they lapse by themselves once backward frees those tensors.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from crepa.config import RepVideoSection
from crepa.models.registry import ModelFamily, detect_family
from crepa.runs import read_gates, read_run_config

TensorRef = weakref.ref  # weak reference to a torch.Tensor


def aggregate(
    previous: torch.Tensor, running_sum: torch.Tensor, count: int, gate: torch.Tensor
) -> torch.Tensor:
    """``gate * running_sum / count + (1 - gate) * previous``; tokens (B, N, C), gate 0-d.

    Written as ``previous + gate * (mean - previous)``: autograd then keeps one tensor per block
    (the difference, for the gate's gradient) and a gate of exactly 0 returns ``previous`` unchanged.
    """
    return previous + gate.to(previous.dtype) * (running_sum / count - previous)


@dataclass
class _Stream:
    """The cache of one token stream (video, or text) during one forward."""

    argument: str  # name of the block input that carries the stream
    output_index: int  # position of the stream in a tuple block output
    running_sum: torch.Tensor | None = None  # (B, N, C): sum of the cached outputs
    count: int = 0
    members: list[TensorRef] = field(default_factory=list)  # the cached tensors, weakly (grad forwards only)

    def restart(self, output: torch.Tensor, recording: bool) -> None:
        self.running_sum, self.count = output, 1
        self.members = [weakref.ref(output)] if recording else []

    def append(self, output: torch.Tensor, recording: bool) -> None:
        assert self.running_sum is not None
        self.running_sum, self.count = self.running_sum + output, self.count + 1
        if recording:
            self.members.append(weakref.ref(output))


@dataclass(frozen=True)
class _ArgumentSlot:
    """Where a block's ``forward`` receives argument ``name``: by keyword, or at ``position``."""

    name: str
    position: int

    def get(self, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.position] if self.position < len(args) else None

    def replace(self, args: tuple, kwargs: dict[str, Any], value: Any) -> tuple[tuple, dict[str, Any]]:
        if self.name in kwargs:
            return args, {**kwargs, self.name: value}
        return (*args[: self.position], value, *args[self.position + 1 :]), kwargs


def _slot(block: nn.Module, name: str) -> _ArgumentSlot:
    parameters = list(inspect.signature(block.forward).parameters)
    if name not in parameters:
        raise ValueError(f"{type(block).__name__}.forward has no {name!r} argument; RepVideo cannot gate it")
    return _ArgumentSlot(name, parameters.index(name))


def _stream_output(output: object, stream: _Stream) -> torch.Tensor:
    """The tokens of ``stream`` in a block's output (a tensor, or a tuple led by the video tokens)."""
    if isinstance(output, (tuple, list)):
        tokens = output[stream.output_index] if stream.output_index < len(output) else None
    else:
        tokens = output if stream.output_index == 0 else None
    if isinstance(tokens, torch.Tensor):
        return tokens
    if stream.output_index == 0:
        raise TypeError(f"RepVideo: a block returned {type(output).__name__}, not video tokens")
    raise ValueError(
        f"include_text: this family's blocks do not return updated text tokens (a block returned "
        f"{type(output).__name__}); its text is a fixed conditioning input, the same tensor at every "
        "block, so there is nothing to aggregate. Install RepVideo with include_text=False."
    )


class RepVideoGates(nn.Module):
    """One learnable gate per block, ``gate``: (depth,), plus the hooks that apply them.

    ``state_dict()`` holds ``gate`` and the settings it was trained with (``window``, ``include_text``,
    as 0-d tensors, so the file is plain safetensors); loading gates saved under other settings raises.
    Made by :func:`install_repvideo`; :meth:`remove` restores the plain transformer.
    """

    def __init__(
        self,
        transformer: nn.Module,
        family: ModelFamily,
        *,
        window: int,
        gate_init: float,
        include_text: bool,
    ) -> None:
        super().__init__()
        blocks = family.blocks(transformer)
        self.depth = len(blocks)
        self.window_size = window
        self.text_included = include_text
        self.gate = nn.Parameter(torch.full((self.depth,), float(gate_init)))
        self.register_buffer("window", torch.tensor(window, dtype=torch.int64))
        self.register_buffer("include_text", torch.tensor(include_text))

        names = ("hidden_states", "encoder_hidden_states") if include_text else ("hidden_states",)
        self._slots = [[_slot(block, name) for name in names] for block in blocks]
        self._streams = [_Stream(name, output_index) for output_index, name in enumerate(names)]
        self._in_forward = False  # between the transformer's pre-hook and its forward hook
        self._recording = False  # the current forward runs with grad enabled
        self._next_block = 0
        self._records: dict[int, tuple[tuple[TensorRef, ...], ...]] = {}  # block -> cache members per stream

        base = transformer
        while hasattr(base, "get_base_model") and base is not base.get_base_model():
            base = base.get_base_model()
        self._handles: list[RemovableHandle] = [
            base.register_forward_pre_hook(self._on_transformer_call),
            base.register_forward_hook(self._on_transformer_return, always_call=True),
        ]
        for index, block in enumerate(blocks):
            self._handles.append(
                block.register_forward_pre_hook(self._make_block_pre_hook(index), with_kwargs=True)
            )
            self._handles.append(block.register_forward_hook(self._make_block_hook(index)))

    def is_gated(self, index: int) -> bool:
        """Whether block ``index`` mixes in the cache mean (the cache holds more than one tensor)."""
        return index > 0 and (index - 1) % self.window_size != 0

    # Hooks --------------------------------------------------------------------------------------

    def _on_transformer_call(self, module: nn.Module, args: tuple) -> None:
        self._in_forward = True
        self._next_block = 0
        self._recording = torch.is_grad_enabled()
        if self._recording:  # a forward without grad never needs recomputing: keep the records
            self._records = {}
        for stream in self._streams:
            stream.running_sum, stream.count, stream.members = None, 0, []

    def _on_transformer_return(self, module: nn.Module, args: tuple, output: object) -> None:
        self._in_forward = False
        for stream in self._streams:
            stream.running_sum, stream.members = None, []

    def _make_block_pre_hook(self, index: int):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._in_forward:
                return self._gate_forward(index, args, kwargs)
            return self._gate_recomputation(index, args, kwargs)

        return hook

    def _make_block_hook(self, index: int):
        def hook(block: nn.Module, args: tuple, output: object) -> None:
            if not self._in_forward or index == self.depth - 1:  # recomputation, or no block follows
                return
            restart = index % self.window_size == 0
            for stream in self._streams:
                tokens = _stream_output(output, stream)
                if restart:
                    stream.restart(tokens, self._recording)
                else:
                    stream.append(tokens, self._recording)

        return hook

    def _gate_forward(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if index != self._next_block:
            raise RuntimeError(
                f"RepVideo expected block {self._next_block} but block {index} ran: the transformer "
                "must call every block once, in the order of the family's block lists"
            )
        self._next_block += 1
        if self._recording and not torch.is_grad_enabled():
            raise RuntimeError(
                "RepVideo: a block ran without grad inside a forward with grad, i.e. under reentrant "
                "gradient checkpointing, which would drop the gradients that flow through the cache. "
                "Use non-reentrant checkpointing (diffusers' default, use_reentrant=False)."
            )
        if not self.is_gated(index):
            return None
        gate = self.gate[index]
        for slot, stream in zip(self._slots[index], self._streams, strict=True):
            previous = slot.get(args, kwargs)
            if not isinstance(previous, torch.Tensor):
                raise ValueError(f"include_text: block {index} received no {stream.argument} tensor")
            assert stream.running_sum is not None
            mixed = aggregate(previous, stream.running_sum, stream.count, gate)
            args, kwargs = slot.replace(args, kwargs, mixed)
        if self._recording:
            self._records[index] = tuple(tuple(stream.members) for stream in self._streams)
        return args, kwargs

    def _gate_recomputation(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Block ``index`` runs outside a forward: gradient checkpointing recomputes it in backward."""
        if not self.is_gated(index):
            return None
        stale = RuntimeError(
            f"RepVideo: block {index} ran outside a transformer forward and is not the "
            "gradient-checkpoint recomputation of the latest forward with grad. Run backward before "
            "the next forward with grad; blocks cannot be called on their own."
        )
        if index not in self._records:
            raise stale
        gate = self.gate[index]
        for slot, members in zip(self._slots[index], self._records[index], strict=True):
            previous = slot.get(args, kwargs)
            cached = [member() for member in members]
            if any(tensor is None for tensor in cached) or cached[-1] is not previous:
                raise stale
            running_sum = cached[0]
            for tensor in cached[1:]:  # the forward's summation order: a bit-identical sum
                running_sum = running_sum + tensor
            args, kwargs = slot.replace(args, kwargs, aggregate(previous, running_sum, len(cached), gate))
        return args, kwargs

    # State --------------------------------------------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, installed in (("window", self.window_size), ("include_text", self.text_included)):
            saved = state_dict.get(prefix + name)
            if saved is not None and type(installed)(saved.item()) != installed:
                error_msgs.append(
                    f"{name}: these gates were trained with {name}={type(installed)(saved.item())} but "
                    f"RepVideo is installed with {name}={installed}; install it with the saved setting"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"depth={self.depth}, window={self.window_size}, include_text={self.text_included}"

    def remove(self) -> None:
        """Remove every hook: the transformer computes exactly its plain forward again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records = {}
        for stream in self._streams:
            stream.running_sum, stream.members = None, []


def install_repvideo(
    transformer: nn.Module,
    window: int = 6,
    gate_init: float = 0.0,
    include_text: bool = False,
) -> RepVideoGates:
    """Install RepVideo on a registered diffusers video transformer; returns its gates (train them).

    window: blocks per cache window (6 in the published code). gate_init: initial value of every
    gate; 0 (default) leaves the pretrained model exactly unchanged, 0.5 is the published
    initialisation. include_text: also aggregate the text tokens, for families whose blocks update
    and return them (CogVideoX, HunyuanVideo, Mochi; per token this is the same as aggregating the
    joint text-and-video sequence); other families raise at the first forward. The gates are created
    on the CPU in float32: move them with the transformer (``gates.to(device)``).
    """
    if window < 1:
        raise ValueError(f"window: must be at least 1 (got {window})")
    family = detect_family(transformer)
    return RepVideoGates(transformer, family, window=window, gate_init=gate_init, include_text=include_text)


def trained_gates_state(settings: RepVideoSection, gate: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state dict of :class:`RepVideoGates` with trained gates ``gate`` (depth,) and the run's
    ``[repvideo]`` settings: what ``repvideo_gates.safetensors`` holds and :func:`load_gates` reads."""
    return {
        "gate": gate,
        "window": torch.tensor(settings.window),
        "include_text": torch.tensor(settings.include_text),
    }


def load_gates(
    transformer: nn.Module, settings: RepVideoSection, gate: torch.Tensor, source: Any
) -> RepVideoGates:
    """Install RepVideo with ``settings`` on ``transformer`` and load the trained gates ``gate`` (depth,);
    frozen, on the transformer's device. ``source`` names where the gates came from in errors."""
    state = trained_gates_state(settings, gate)
    gates = install_repvideo(transformer, settings.window, settings.gate_init, settings.include_text)
    try:
        gates.load_state_dict(state)
    except RuntimeError as error:
        gates.remove()
        raise ValueError(f"{source}: its RepVideo gates do not fit this transformer ({error})") from None
    return gates.requires_grad_(False).to(next(transformer.parameters()).device)


def load(pipeline: Any, run_dir: str | Path, checkpoint: str | None = None) -> RepVideoGates:
    """Install the RepVideo gates a crepa run trained on ``pipeline.transformer`` (or on a transformer).

    Reads the run's settings (window, include_text) and its final gates, or those of ``checkpoint``
    (e.g. ``"step-000750"``); the gates are frozen, on the transformer's device. Load the run's LoRA
    into the pipeline as usual (``pipeline.load_lora_weights(run_dir)``); RepVideo changes the
    transformer's forward, so only crepa-aware code applies it::

        pipeline = WanPipeline.from_pretrained(base)
        pipeline.load_lora_weights("runs/my_run")
        crepa.repvideo.load(pipeline, "runs/my_run")
    """
    config = read_run_config(run_dir)
    gate = read_gates(run_dir, config, checkpoint)  # before any hook goes in: it may raise
    return load_gates(getattr(pipeline, "transformer", pipeline), config.repvideo, gate, run_dir)
