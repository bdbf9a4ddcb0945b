"""The alignment coefficient lambda over training: warmup, decay, hard cutoff and similarity cutoff."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

DecayKind = Literal["constant", "linear", "cosine", "polynomial"]
DECAY_KINDS: tuple[str, ...] = ("constant", "linear", "cosine", "polynomial")
CUTOFF_MODES: tuple[str, ...] = ("permanent", "recoverable")


@dataclass
class AlignmentSchedule:
    """lambda(step): linear warmup to ``weight``, then a decay to ``end_weight`` over ``decay_steps``.

    ``cutoff_step``: lambda = 0 from that step on. ``ema_threshold``: lambda = 0 once the EMA of the
    alignment score rises above the threshold; "permanent" never re-enables, "recoverable"
    re-enables when the EMA falls back below it. The EMA lives on the device and is only read
    back (a host sync) every ``ema_check_every`` updates, so the step never waits on the GPU.

    Under data parallelism (an initialised ``torch.distributed`` group) each update first averages
    the score over the processes (one 0-d all-reduce), so the EMA, and with it every cutoff
    decision, is the same on every rank; ``local_ema`` keeps this process's own EMA for reporting.
    ``cut_step`` is the first step trained at weight 0 after the latest similarity cutoff.
    """

    weight: float
    warmup_steps: int = 0
    decay: DecayKind = "constant"
    decay_steps: int = 0
    end_weight: float = 0.0
    power: float = 1.0
    cutoff_step: int | None = None
    ema_threshold: float | None = None
    ema_decay: float = 0.99
    cutoff_mode: Literal["permanent", "recoverable"] = "permanent"
    ema_check_every: int = 10
    _ema: torch.Tensor | None = field(default=None, init=False, repr=False)
    _updates: int = field(default=0, init=False, repr=False)
    _cut: bool = field(default=False, init=False, repr=False)
    _local_ema: torch.Tensor | None = field(default=None, init=False, repr=False)
    cut_step: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.decay not in DECAY_KINDS:
            raise ValueError(f"decay must be one of {DECAY_KINDS}, got {self.decay!r}")
        if self.cutoff_mode not in CUTOFF_MODES:
            raise ValueError(f"cutoff_mode must be one of {CUTOFF_MODES}, got {self.cutoff_mode!r}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_check_every < 1:
            raise ValueError(f"ema_check_every must be >= 1, got {self.ema_check_every}")

    def planned_weight(self, step: int) -> float:
        """Warmup / decay / hard-cutoff value at ``step``, ignoring the similarity cutoff."""
        if self.cutoff_step is not None and step >= self.cutoff_step:
            return 0.0
        if step < self.warmup_steps:
            return self.weight * (step + 1) / self.warmup_steps
        if self.decay == "constant" or self.decay_steps == 0:
            return self.weight
        progress = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        if self.decay == "linear":
            factor = 1.0 - progress
        elif self.decay == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = (1.0 - progress) ** self.power
        return self.end_weight + (self.weight - self.end_weight) * factor

    def weight_at(self, step: int) -> float:
        """The coefficient to use at ``step``: 0 while the similarity cutoff is active."""
        return 0.0 if self._cut else self.planned_weight(step)

    @property
    def needs_score(self) -> bool:
        """True when the score must be measured even at weight 0 (a recoverable cutoff watches it)."""
        return self.ema_threshold is not None and self.cutoff_mode == "recoverable"

    def update(self, score: torch.Tensor, step: int | None = None) -> None:
        """Feed this step's (detached, 0-d) alignment score into the EMA (``step``: for ``cut_step``)."""
        if self.ema_threshold is None:
            return
        score = score.detach().float()
        self._local_ema = _ema_step(self._local_ema, score, self.ema_decay)
        self._ema = _ema_step(self._ema, _mean_over_processes(score), self.ema_decay)
        self._updates += 1
        if self._updates % self.ema_check_every == 0:
            above = bool(self._ema > self.ema_threshold)  # the only host sync, at the check interval
            was_cut = self._cut
            self._cut = (self._cut or above) if self.cutoff_mode == "permanent" else above
            if self._cut and not was_cut and step is not None:
                self.cut_step = step + 1

    @property
    def ema(self) -> torch.Tensor | None:
        """The EMA the cutoff reads (averaged over processes under data parallelism)."""
        return self._ema

    @property
    def local_ema(self) -> torch.Tensor | None:
        """This process's own score EMA (equal to ``ema`` in a single process)."""
        return self._local_ema

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": None if self._ema is None else self._ema.detach().cpu().clone(),
            "updates": self._updates,
            "cut": self._cut,
            "cut_step": self.cut_step,
            "local_ema": None if self._local_ema is None else self._local_ema.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state["ema"]
        self._ema = None if ema is None else torch.as_tensor(ema, dtype=torch.float32).clone()
        self._updates = int(state["updates"])
        self._cut = bool(state["cut"])
        self.cut_step = state.get("cut_step")
        local = state.get("local_ema", ema)
        self._local_ema = None if local is None else torch.as_tensor(local, dtype=torch.float32).clone()


def _ema_step(ema: torch.Tensor | None, value: torch.Tensor, decay: float) -> torch.Tensor:
    if ema is None:
        return value.clone()
    return ema.to(value.device).mul_(decay).add_(value, alpha=1.0 - decay)


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the processes of the default group (itself without one)."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return value
    total = value.clone()
    distributed.all_reduce(total)
    return total / distributed.get_world_size()
