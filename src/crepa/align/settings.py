"""The alignment term's settings (:class:`CrepaConfig`): pydantic validation and the schedule they
build. Pure settings, no files or models; :mod:`crepa.regularizer` re-exports it as the drop-in API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from crepa.align.schedule import AlignmentSchedule


class CrepaConfig(BaseModel):
    """Settings of the alignment term. Invalid values raise ``ValueError`` naming the field.

    mode: "crepa" (cross-frame, the default), "repa" (REPA*, frame-wise: distance 0) or
    "backbone" (teacher = block ``teacher_block_index`` of the same forward, detached).
    block_index None means the family's default block.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["crepa", "repa", "backbone"] = "crepa"
    block_index: int | None = Field(default=None, ge=0)
    teacher_block_index: int | None = Field(default=None, ge=0)
    weight: float = Field(default=0.5, ge=0)
    distance: int = Field(default=1, ge=0)
    tau: float = Field(default=1.0, gt=0)
    cumulative: bool = False
    normalize_by_frames: bool = True
    normalize_weights: bool = False
    projector: Literal["mlp", "linear"] = "mlp"
    projector_hidden_dim: int = Field(default=2048, ge=1)
    # Schedule of the coefficient (see crepa.align.AlignmentSchedule).
    warmup_steps: int = Field(default=0, ge=0)
    decay: Literal["constant", "linear", "cosine", "polynomial"] = "constant"
    decay_steps: int = Field(default=0, ge=0)
    end_weight: float = Field(default=0.0, ge=0)
    decay_power: float = Field(default=1.0, gt=0)
    cutoff_step: int | None = Field(default=None, ge=0)
    ema_threshold: float | None = None
    ema_decay: float = Field(default=0.99, ge=0, lt=1)
    cutoff_mode: Literal["permanent", "recoverable"] = "permanent"

    @model_validator(mode="after")
    def _check_combinations(self) -> CrepaConfig:
        if self.mode == "repa":
            if "distance" in self.model_fields_set and self.distance != 0:
                raise ValueError(
                    f"distance: mode 'repa' (REPA*) aligns each frame with itself only, so distance "
                    f"must be 0 (got {self.distance}); use mode 'crepa' for cross-frame alignment"
                )
            object.__setattr__(self, "distance", 0)
        if self.mode == "backbone":
            if self.teacher_block_index is None:
                raise ValueError("teacher_block_index: mode 'backbone' needs the index of the teacher block")
            if self.block_index is not None and self.teacher_block_index <= self.block_index:
                raise ValueError(
                    f"teacher_block_index: must be deeper than block_index={self.block_index} "
                    f"(got {self.teacher_block_index})"
                )
        elif self.teacher_block_index is not None:
            raise ValueError(
                f"teacher_block_index: only used with mode 'backbone' (mode is {self.mode!r}); "
                "remove it or set mode = 'backbone'"
            )
        return self

    def schedule(self) -> AlignmentSchedule:
        """A fresh :class:`AlignmentSchedule` for these settings."""
        return AlignmentSchedule(
            weight=self.weight,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            decay_steps=self.decay_steps,
            end_weight=self.end_weight,
            power=self.decay_power,
            cutoff_step=self.cutoff_step,
            ema_threshold=self.ema_threshold,
            ema_decay=self.ema_decay,
            cutoff_mode=self.cutoff_mode,
        )
