"""Cross-frame representation alignment: the CREPA loss (and REPA* as its d = 0 case).

For student features s and teacher features y on one token grid, frame f of sample b:

    s_b(k, f) = (1/N) sum_n cos(y_b[k, n], s_b[f, n])
    S_b       = sum_f [ s_b(f, f) + sum_{k in K(f)} exp(-|k - f| / tau) * s_b(k, f) ]
    loss      = -(1/B) sum_b S_b / F            (the / F only with normalize_by_frames)

K(f) = {f - d, f + d} inside [0, F) (every offset 1..d when cumulative). Because the teacher is
frozen, the bracket equals the cosine-weighted dot of the student with one *weighted teacher sum*
Y_b[f] = y_b[f] + sum_k w_k y_b[k]; building Y costs O(d) passes over the teacher and the student
is read once, never as an (F x F x N) similarity tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AlignmentResult:
    """Output of :func:`cross_frame_alignment`.

    loss: differentiable scalar (to be minimised). sim_self: mean over (b, f) of s_b(f, f).
    score: mean over (b, f) of the bracket. Both metrics are detached 0-d tensors.
    """

    loss: torch.Tensor
    sim_self: torch.Tensor
    score: torch.Tensor


def neighbour_offsets(distance: int, cumulative: bool) -> list[int]:
    """Frame offsets o > 0 whose frames f - o and f + o are neighbours of f."""
    if distance < 0:
        raise ValueError(f"distance must be >= 0, got {distance}")
    if distance == 0:
        return []
    return list(range(1, distance + 1)) if cumulative else [distance]


def weighted_neighbour_sum(
    teacher: torch.Tensor, offsets: list[int], tau: float, normalize_weights: bool = False
) -> torch.Tensor:
    """Y[:, f] = y[:, f] + sum_{o in offsets} exp(-o/tau) (y[:, f-o] + y[:, f+o]), out-of-clip frames dropped.

    teacher: (B, F, N, D). With ``normalize_weights`` every frame is divided by its own total weight
    (1 + the weights of the neighbours that exist), so the bracket is a weighted mean and stays <= 1.
    """
    num_frames = teacher.shape[1]
    total = teacher.clone()
    weight_sum = torch.ones(num_frames, dtype=teacher.dtype, device=teacher.device)
    for offset in offsets:
        if offset >= num_frames:
            continue
        w = math.exp(-offset / tau)
        total[:, :-offset].add_(teacher[:, offset:], alpha=w)  # neighbour f + o of frame f
        total[:, offset:].add_(teacher[:, :-offset], alpha=w)  # neighbour f - o of frame f
        weight_sum[:-offset] += w
        weight_sum[offset:] += w
    if normalize_weights and offsets:
        total.div_(weight_sum.view(1, num_frames, 1, 1))
    return total


def cross_frame_alignment(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance: int = 1,
    tau: float = 1.0,
    cumulative: bool = False,
    normalize_by_frames: bool = True,
    normalize_weights: bool = False,
) -> AlignmentResult:
    """CREPA alignment between projected student tokens and teacher tokens.

    student: (B, F, N, D) projector output (gradients flow into it).
    teacher: (B, F, N, D) teacher features on the same token grid (treated as a constant).
    distance=0 gives REPA* (frame-wise alignment only). ``normalize_weights`` divides each frame's
    bracket by its total weight (off by default, as in the paper).
    """
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(
            "cross_frame_alignment expects student and teacher of equal shape (B, F, N, D); "
            f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    offsets = neighbour_offsets(distance, cumulative)
    # Reductions in float32 even for half-precision students: cosine sums lose digits in bf16.
    work_dtype = torch.promote_types(student.dtype, torch.float32)
    student = student.to(work_dtype)
    with torch.no_grad():
        unit_teacher = F.normalize(teacher.detach().to(work_dtype), dim=-1)
        target = weighted_neighbour_sum(unit_teacher, offsets, tau, normalize_weights)

    # cos(Y, s) summed over k == <Y, s> / |s| because every teacher row is unit length.
    inv_norm = torch.linalg.vector_norm(student, dim=-1).clamp_min(1e-12).reciprocal()  # (B, F, N)
    bracket = (torch.einsum("bfnd,bfnd->bfn", student, target) * inv_norm).mean(-1)  # (B, F)
    score = bracket.mean()
    loss = -score if normalize_by_frames else -score * student.shape[1]

    with torch.no_grad():
        if offsets:
            self_term = (torch.einsum("bfnd,bfnd->bfn", student, unit_teacher) * inv_norm).mean()
        else:
            self_term = score.detach()
    return AlignmentResult(loss=loss, sim_self=self_term, score=score.detach())
