"""EMA of the trained weights: :class:`WeightEMA` keeps e <- decay * e + (1 - decay) * w for every
trainable tensor (LoRA or the whole transformer, the CREPA projector, the RepVideo gates).

Each shadow is this rank's part of the weight it follows (the local shard of an FSDP2 parameter, the
whole tensor otherwise), in float32, on the weight's device (``device = "gpu"``) or in host memory
(``"cpu"``: less accelerator memory, one copy to the host per update). Updates are fused
``torch._foreach_*`` kernels with no host sync. Saving gathers whole tensors (a collective under
FSDP, like the weights' own checkpoint); loading takes each rank's shard of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from crepa.train.parallel import full_tensor
from crepa.train.parallel import local_shard as _local


class WeightEMA:
    """EMA of ``params`` (saved name -> parameter, the names of
    :func:`crepa.train.checkpoint.trainable_state`). Up to ``start_step`` the EMA is the weights
    themselves; after it, every ``update_every``-th step moves it by ``1 - decay`` towards them."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        decay: float,
        update_every: int = 1,
        start_step: int = 0,
        device: Literal["gpu", "cpu"] = "gpu",
    ) -> None:
        self.params = params
        self.decay = decay
        self.update_every = update_every
        self.start_step = start_step
        self.on_host = device == "cpu"
        self.shadows = {
            name: self._to_shadow_device(_local(p).detach()).float().clone() for name, p in params.items()
        }

    def _to_shadow_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to("cpu") if self.on_host else tensor

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimiser step ``step`` (1-based): copy the weights up to ``start_step``, then lerp."""
        if step > self.start_step and (step - self.start_step) % self.update_every:
            return
        shadows = list(self.shadows.values())
        weights = [self._to_shadow_device(_local(p).detach()).float() for p in self.params.values()]
        if step <= self.start_step:
            torch._foreach_copy_(shadows, weights)
        else:
            torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole EMA tensors on the CPU by name (gathered from the shards: every rank must call it)."""
        return {name: self._full(name).to("cpu").contiguous() for name in self.shadows}

    def _full(self, name: str) -> torch.Tensor:
        param, shadow = self.params[name], self.shadows[name]
        if isinstance(param, DTensor):
            local = shadow.to(param.to_local().device)
            shadow = DTensor.from_local(
                local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            )
        return full_tensor(shadow)

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take this rank's part of saved whole tensors; every name must be present with its shape."""
        missing = sorted(set(self.shadows) - set(tensors))
        if missing:
            raise KeyError(f"EMA weights missing from the checkpoint: {', '.join(missing[:5])}")
        for name, shadow in self.shadows.items():
            param, full = self.params[name], tensors[name]
            if isinstance(param, DTensor):
                full = distribute_tensor(
                    full.to(param.to_local().device), param.device_mesh, param.placements
                )
            shadow.copy_(_local(full))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the parameters for the duration of the block (validation, export), the
        trained weights back afterwards, bit for bit. Every rank of a sharded model must enter it."""
        params = [_local(p) for p in self.params.values()]
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            torch._foreach_copy_(
                params, [s.to(p.device, p.dtype) for s, p in zip(self.shadows.values(), params, strict=True)]
            )
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)
