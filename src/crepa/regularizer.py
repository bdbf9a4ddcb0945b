"""The drop-in API: :class:`CrepaConfig` (defined in :mod:`crepa.align.settings`, re-exported here) and
:class:`CrepaRegularizer` for any training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from crepa.align import CrepaConfig, build_projector, cross_frame_alignment, resample_grid
from crepa.models import BlockCapture, detect_family

__all__ = ["CrepaConfig", "CrepaOutput", "CrepaRegularizer", "match_teacher_frames"]


@dataclass(frozen=True)
class CrepaOutput:
    """loss: weighted alignment loss to add to the diffusion loss. metrics: detached 0-d tensors."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def match_teacher_frames(teacher: torch.Tensor, frames: int) -> torch.Tensor:
    """Average groups of consecutive teacher frames when the student patches time (e.g. CogVideoX 1.5).

    teacher: (B, F_t, h, w, D) with F_t a multiple of ``frames`` -> (B, frames, h, w, D).
    """
    teacher_frames = teacher.shape[1]
    if teacher_frames == frames:
        return teacher
    if teacher_frames % frames != 0:
        raise ValueError(
            f"teacher grid has {teacher_frames} latent frames but the block has {frames}; "
            "compute teacher features for the same clip and latent frame count as the latents"
        )
    return teacher.unflatten(1, (frames, teacher_frames // frames)).mean(dim=2)


class CrepaRegularizer(nn.Module):
    """Hooks one block of ``transformer`` and turns its output into the CREPA (or REPA*) loss.

    After each ``transformer(...)`` forward, call :meth:`loss` with the teacher grid
    (B, F', h, w, D) of the clean clip (None in backbone mode). ``parameters()`` are the projector's.
    """

    def __init__(self, transformer: nn.Module, config: CrepaConfig, teacher_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.family = detect_family(transformer)
        depth = len(self.family.blocks(transformer))
        self.block_index = (
            config.block_index
            if config.block_index is not None
            else min(self.family.default_block_index, depth - 1)
        )
        student_dim = self.family.hidden_size(transformer)
        if config.mode == "backbone":
            assert config.teacher_block_index is not None  # checked by CrepaConfig
            if config.teacher_block_index <= self.block_index:
                raise ValueError(
                    f"teacher_block_index: must be deeper than block_index={self.block_index} "
                    f"(got {config.teacher_block_index})"
                )
            teacher_dim = student_dim
        elif teacher_dim is None:
            raise ValueError("teacher_dim: give the teacher's feature width (e.g. 1536 for DINOv2-g)")
        self.teacher_dim = teacher_dim
        self.projector = build_projector(
            config.projector, student_dim, teacher_dim, config.projector_hidden_dim
        )
        self.schedule = config.schedule()
        self.capture = BlockCapture(transformer, self.block_index, self.family)
        # Recompute the head in backward when the transformer recomputes its blocks (activation budget).
        self.recompute = bool(getattr(transformer, "is_gradient_checkpointing", False))
        self.teacher_capture = (
            BlockCapture(transformer, config.teacher_block_index, self.family, detach=True)
            if config.mode == "backbone" and config.teacher_block_index is not None
            else None
        )

    def loss(self, teacher_grid: torch.Tensor | None = None, *, step: int) -> CrepaOutput:
        """Weighted alignment loss for the last forward.

        teacher_grid: (B, F', h, w, D) teacher features of the clean clip per latent frame, any
        (h, w) (resampled in 2-D to the block's grid); None in backbone mode.
        """
        student_tokens = self.capture.pop()  # (B, F', H', W', C)
        teacher_tokens = self.teacher_capture.pop() if self.teacher_capture is not None else None
        weight = self.schedule.weight_at(step)
        device = student_tokens.device
        if weight == 0.0 and not self.schedule.needs_score:
            zero = torch.zeros((), device=device)
            metrics = {"crepa/loss": zero, "crepa/weight": zero, "crepa/active": zero}
            return CrepaOutput(loss=zero, metrics=metrics)

        _, frames, height, width, _ = student_tokens.shape
        if teacher_tokens is None:
            if teacher_grid is None:
                raise ValueError("teacher_grid: required unless mode = 'backbone'")
            if teacher_grid.ndim != 5 or teacher_grid.shape[-1] != self.teacher_dim:
                raise ValueError(
                    f"teacher_grid: expected shape (B, F', h, w, {self.teacher_dim}), "
                    f"got {tuple(teacher_grid.shape)}"
                )
            teacher_tokens = resample_grid(
                match_teacher_frames(teacher_grid.to(device), frames), (height, width)
            )

        with torch.set_grad_enabled(weight != 0.0 and torch.is_grad_enabled()):
            if self.recompute and torch.is_grad_enabled():
                # Only the head's inputs are kept for backward (the block output is already held by the
                # next block; the teacher grid is the batch's): its MLP activations are recomputed.
                loss, sim_self, score = checkpoint(
                    self._head, student_tokens, teacher_tokens, use_reentrant=False
                )
            else:
                loss, sim_self, score = self._head(student_tokens, teacher_tokens)
        self.schedule.update(score, step=step)
        metrics = {
            "crepa/loss": loss.detach(),
            "crepa/sim_self": sim_self,
            "crepa/score": score,
            # filled on the device: torch.tensor(python_float, device=cuda) would be a blocking copy
            "crepa/weight": torch.full((), weight, device=device),
            "crepa/active": torch.full((), float(weight != 0.0), device=device),
        }
        loss = loss * weight if weight != 0.0 else torch.zeros((), device=device)
        return CrepaOutput(loss=loss, metrics=metrics)

    def _head(
        self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projector (under the caller's autocast, fp32 weights) then the alignment in fp32.

        student_tokens (B, F', H', W', C) in the block's dtype, teacher_tokens (B, F', H', W', D) in
        the stored dtype (e.g. float16): neither is upcast as a whole before the projector.
        """
        student = self.projector(student_tokens).flatten(2, 3)  # (B, F', N, D)
        device_type = student.device.type if torch.amp.is_autocast_available(student.device.type) else "cpu"
        with torch.autocast(device_type, enabled=False):  # the reductions choose their dtype
            result = cross_frame_alignment(
                student,
                teacher_tokens.flatten(2, 3),
                distance=self.config.distance,
                tau=self.config.tau,
                cumulative=self.config.cumulative,
                normalize_by_frames=self.config.normalize_by_frames,
                normalize_weights=self.config.normalize_weights,
            )
        return result.loss, result.sim_self, result.score

    def get_extra_state(self) -> dict:
        """Saved with ``state_dict()`` next to the projector: the schedule's EMA and cutoff state."""
        return {"schedule": self.schedule.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])

    def remove(self) -> None:
        """Remove the hooks from the transformer."""
        self.capture.remove()
        if self.teacher_capture is not None:
            self.teacher_capture.remove()
