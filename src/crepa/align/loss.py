"""Cross-frame representation alignment: the CREPA loss (and REPA* as its d = 0 case).

For student features s and teacher features y on one token grid, frame f of sample b:

    s_b(k, f) = (1/N) sum_n cos(y_b[k, n], s_b[f, n])
    S_b       = sum_f [ s_b(f, f) + sum_{k in K(f)} exp(-|k - f| / tau) * s_b(k, f) ]
    loss      = -(1/B) sum_b S_b / F            (the / F only with normalize_by_frames)

K(f) = {f - d, f + d} inside [0, F) (every offset 1..d when cumulative).

Implementation: tokens are flattened to (B*F*N, D) rows, so the pairs (f, f + o) are two contiguous
row ranges shifted by o*N and every cosine is one batched dot product, without copies and without an
(F x F x N) tensor; pairs that straddle two samples get weight 0. The backward pass is written by hand
(:class:`_CrossFrameCosine`) so it allocates one student-sized gradient and accumulates every term
into it in place: autograd would allocate one per term. Work is linear in the number of offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def _pair_terms(frames: int, offsets: list[int], tau: float) -> list[tuple[int, float]]:
    """(signed frame shift, weight) of every neighbour term: shift +o pairs student f with teacher f + o."""
    terms = []
    for offset in offsets:
        if offset < frames:
            weight = math.exp(-offset / tau)
            terms += [(offset, weight), (-offset, weight)]
    return terms


def _shifted_rows(rows: torch.Tensor, shift: int) -> tuple[slice, slice]:
    """Row slices (student, teacher) pairing student row i with teacher row i + shift."""
    total = rows.shape[0]
    if shift >= 0:
        return slice(0, total - shift), slice(shift, total)
    return slice(-shift, total), slice(0, total + shift)


def _frame_valid(batch: int, frames: int, tokens: int, shift: int, device: torch.device) -> torch.Tensor:
    """(B*F*N,) 0/1 mask: student row (b, f, n) has its partner frame f + shift inside the same clip."""
    frame = torch.arange(frames, device=device)
    valid = ((frame + shift >= 0) & (frame + shift < frames)).float()
    return valid.view(1, frames, 1).expand(batch, frames, tokens).reshape(-1)


class _CrossFrameCosine(torch.autograd.Function):
    """Per-token brackets sum_k w_k cos(y_k, s_f) over rows (B*F*N, D), with a hand-written backward.

    forward(student_rows, teacher_rows, shape, terms, frame_weight) -> (bracket, self_cos), both (B*F*N,).
    frame_weight (B*F*N,) scales each row's bracket (1 / total weight with normalize_weights, else 1).
    """

    @staticmethod
    def forward(ctx, student, teacher, shape, terms, frame_weight):  # type: ignore[override]
        batch, frames, tokens = shape
        inv_s = torch.linalg.vector_norm(student, dim=-1).clamp_min(1e-12).reciprocal()
        inv_t = torch.linalg.vector_norm(teacher, dim=-1).clamp_min(1e-12).reciprocal()
        self_cos = torch.einsum("td,td->t", student, teacher) * inv_s * inv_t
        bracket = self_cos.clone()
        coefficients = []  # per term: (shift, w * valid * inv_t(partner)) for the backward
        for shift, weight in terms:
            s_rows, t_rows = _shifted_rows(student, shift * tokens)
            valid = _frame_valid(batch, frames, tokens, shift, student.device)[s_rows]
            scale = inv_t[t_rows] * valid * weight
            bracket[s_rows] += (
                torch.einsum("td,td->t", student[s_rows], teacher[t_rows]) * inv_s[s_rows] * scale
            )
            coefficients.append(scale)
        ctx.save_for_backward(student, teacher, inv_s, inv_t, bracket, frame_weight, *coefficients)
        ctx.shifts = [shift * tokens for shift, _ in terms]
        ctx.mark_non_differentiable(self_cos)
        return bracket * frame_weight, self_cos

    @staticmethod
    def backward(ctx, grad_bracket, _grad_self):  # type: ignore[override]
        student, teacher, inv_s, inv_t, bracket, frame_weight, *coefficients = ctx.saved_tensors
        g = (
            grad_bracket * frame_weight * inv_s
        )  # d(bracket row)/d(s) = inv_s * (sum_k w_k y_k/|y_k| - bracket s/|s|)
        grad = student * (-(g * bracket * inv_s)).unsqueeze(-1)  # the one student-sized allocation
        grad.addcmul_(teacher, (g * inv_t).unsqueeze(-1))
        for shift, scale in zip(ctx.shifts, coefficients, strict=True):
            s_rows, t_rows = _shifted_rows(student, shift)
            grad[s_rows].addcmul_(teacher[t_rows], (g[s_rows] * scale).unsqueeze(-1))
        return grad, None, None, None, None


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
    bracket by its total weight 1 + sum_k w_k, so the score stays <= 1 (off by default, as in the paper).
    """
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(
            "cross_frame_alignment expects student and teacher of equal shape (B, F, N, D); "
            f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    batch, frames, tokens, dim = student.shape
    terms = _pair_terms(frames, neighbour_offsets(distance, cumulative), tau)
    # Reductions in float32 even for half-precision students: cosine sums lose digits in bf16.
    work_dtype = torch.promote_types(student.dtype, torch.float32)
    student_rows = student.to(work_dtype).contiguous().view(-1, dim)
    teacher_rows = teacher.detach().to(work_dtype).contiguous().view(-1, dim)

    frame_weight = torch.ones(batch * frames * tokens, dtype=work_dtype, device=student.device)
    if normalize_weights and terms:
        total = torch.ones(frames, dtype=work_dtype, device=student.device)
        for shift, weight in terms:
            total += weight * _frame_valid(1, frames, 1, shift, student.device).to(work_dtype)
        frame_weight = total.reciprocal().view(1, frames, 1).expand(batch, frames, tokens).reshape(-1)

    bracket, self_cos = _CrossFrameCosine.apply(
        student_rows, teacher_rows, (batch, frames, tokens), terms, frame_weight
    )
    score = bracket.view(batch, frames, tokens).mean()
    loss = -score if normalize_by_frames else -score * frames
    return AlignmentResult(loss=loss, sim_self=self_cos.mean(), score=score.detach())
