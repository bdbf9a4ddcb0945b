"""Never keep a non-finite update: :class:`UpdateGuard` snapshots the trainable parameters and
their optimiser state before each optimiser step and restores them when the gradient norm or the
updated parameters are not finite (an absurd learning rate turns finite gradients into inf / NaN
weights). The snapshot and the check are fused ``torch._foreach_*`` kernels on the device; the
decision costs the one host sync the step already had.
"""

from __future__ import annotations

import torch
from torch import nn

from crepa.train.parallel import local_shard as _local


class UpdateGuard:
    """Wraps ``optimizer.step()`` for ``params`` (the parameters the optimiser updates)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.params = params
        self._param_copies = [torch.empty_like(_local(p)) for p in params]
        self._state_copies: list[torch.Tensor] = []

    def _state_tensors(self) -> list[torch.Tensor]:
        """The optimiser's state tensors of ``params`` (updated in place by torch's optimisers)."""
        return [
            _local(value)
            for p in self.params
            for value in self.optimizer.state.get(p, {}).values()
            if isinstance(value, torch.Tensor)
        ]

    @torch.no_grad()
    def step(self, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """Run the optimiser step and keep it only if ``grad_norm`` and the new parameters are finite.

        Returns (gradient finite, parameters finite); when either is False the parameters and the
        optimiser state are exactly as before the call."""
        params = [_local(p.detach()) for p in self.params]
        torch._foreach_copy_(self._param_copies, params)
        state = self._state_tensors()
        if len(self._state_copies) != len(state):  # the first steps create the state
            self._state_copies = [value.clone() for value in state]
        elif state:
            torch._foreach_copy_(self._state_copies, state)
        had_state = [bool(self.optimizer.state.get(p)) for p in self.params]
        # plain numbers in the state (bitsandbytes counts its steps in a Python int), restored with the rest
        numbers = [
            (entry, key, value)
            for p in self.params
            for entry in [self.optimizer.state.get(p, {})]
            for key, value in entry.items()
            if not isinstance(value, torch.Tensor)
        ]
        self.optimizer.step()
        # the largest |value| of each parameter (no overflow for large finite weights, unlike the 2-norm)
        # is non-finite exactly when the parameter holds a NaN or inf; so is their max (NaN propagates)
        total = torch.stack([norm.float() for norm in torch._foreach_norm(params, float("inf"))]).amax()
        flags = torch.stack([torch.isfinite(grad_norm.float()).to(total.device), torch.isfinite(total)]).int()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # sharded parameters (FSDP): every rank must take the same decision
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        grad_ok, params_ok = (bool(flag) for flag in flags.tolist())  # the one host sync of the step
        if not (grad_ok and params_ok):
            torch._foreach_copy_(params, self._param_copies)
            if state:
                torch._foreach_copy_(state, self._state_copies)
            for entry, key, value in numbers:
                entry[key] = value
            for p, had in zip(self.params, had_state, strict=True):
                if not had:
                    self.optimizer.state.pop(p, None)
        return grad_ok, params_ok


def loss_scale_search(scaler: torch.amp.GradScaler | None, step_was_skipped: bool) -> float | None:
    """The new loss scale when fp16's GradScaler has just skipped an update for an overflowing gradient
    and lowered its scale, which is still >= 1; None otherwise.

    Such a skip is the scaler searching for a scale that fits fp16 (it starts at 2**16 and halves on
    every overflow), not a divergence: the trainer neither counts it against
    ``train.max_nonfinite_steps`` nor calls it non-finite. Below a scale of 1 an overflow is real.
    ``scaler.get_scale()`` syncs with the host, in fp16 runs only, where the scaler already did.
    """
    if scaler is None or not step_was_skipped:
        return None
    scale = scaler.get_scale()
    return scale if scale >= 1.0 else None
