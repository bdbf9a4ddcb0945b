"""The state of a training run: :class:`TrainProgress` (where the run stands, saved in every
checkpoint) and :class:`TrainState` (everything :func:`~crepa.train.setup.build_run` sets up and the
loop, :func:`~crepa.train.recipe.optimizer_step`, ``save_checkpoint`` and ``finish`` read), plus the
summary a run writes when it ends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from crepa.config import RunConfig
from crepa.models import ModelFamily
from crepa.regularizer import CrepaRegularizer
from crepa.train.ema import WeightEMA
from crepa.train.guard import UpdateGuard
from crepa.train.parallel import load_optimizer_state_by_name, optimizer_state_by_name
from crepa.train.step import StepParts


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
    device: str = "cpu"  # where rank 0 trained, e.g. "cuda:0 (NVIDIA H200)"
    config: dict[str, Any] = field(default_factory=dict)
    stop_signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    start_step: int = 0  # where this run began: 0, or the step of the checkpoint it resumed


@dataclass
class TrainProgress:
    """Where a run stands. ``step``: optimiser steps done; ``position``: micro-batches drawn from the
    batch order (so a resumed run reads the batches an uninterrupted one would); ``skipped_nonfinite``:
    updates undone for a non-finite gradient or weights. ``nonfinite_streak`` (such updates in a row)
    is not saved: a resumed run starts a fresh streak."""

    step: int = 0
    position: int = 0
    skipped_nonfinite: int = 0
    nonfinite_streak: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "position": self.position, "skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.position = state["step"], state["position"]
        self.skipped_nonfinite = state["skipped_nonfinite"]


@dataclass
class TrainState:
    """A training run once set up. ``parts`` holds what a step reads (config, family, the transformer
    the loop calls, maybe DDP-wrapped, the regularizer); ``modules`` maps each saved part ("transformer", "projector", "repvideo_gates") to its plain
    module, ``side_modules`` the ones trained next to the transformer outside DDP / FSDP; ``names``
    maps parameter ids to those saved names (optimiser state is saved by name)."""

    parts: StepParts
    accelerator: Accelerator
    sharding: str  # "none" or "fsdp"
    side_modules: dict[str, nn.Module]
    modules: dict[str, nn.Module]
    names: dict[int, str]
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    guard: UpdateGuard
    checkpoints: Path
    metrics_log: Path
    started: float
    start_step: int = 0  # 0, or the step of the checkpoint this run resumed
    ema: WeightEMA | None = None
    progress: TrainProgress = field(default_factory=TrainProgress)
    data: Iterator[dict[str, torch.Tensor]] | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    stop_signal: str | None = None

    @property
    def config(self) -> RunConfig:
        return self.parts.config

    @property
    def family(self) -> ModelFamily:
        return self.parts.family

    @property
    def transformer(self) -> nn.Module:
        return self.parts.transformer

    @property
    def regularizer(self) -> CrepaRegularizer | None:
        return self.parts.regularizer

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``training_state`` document. Every rank calls it: gathering sharded
        optimiser state is a collective."""
        return {
            **self.progress.state_dict(),
            "optimizer": optimizer_state_by_name(self.optimizer, self.names),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "alignment_schedule": None
            if self.regularizer is None
            else self.regularizer.schedule.state_dict(),
            "config": json.loads(self.config.model_dump_json()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore optimiser, LR scheduler, alignment schedule and progress from a checkpoint."""
        load_optimizer_state_by_name(self.optimizer, state["optimizer"], self.names)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.regularizer is not None and state.get("alignment_schedule") is not None:
            self.regularizer.schedule.load_state_dict(state["alignment_schedule"])
        self.progress.load_state_dict(state)
