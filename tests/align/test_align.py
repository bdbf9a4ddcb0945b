"""crepa.align against independent references: naive loops over the paper's equation, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from crepa.align import (
    AlignmentSchedule,
    build_projector,
    cross_frame_alignment,
    latent_frame_features,
    resample_grid,
    tokens_to_grid,
)


def naive_crepa(student, teacher, distance, tau, cumulative, normalize_by_frames, normalize_weights=False):
    """Loop-by-loop transcription of the CREPA equation (float64 python floats)."""
    batch, frames, tokens, _ = student.shape

    def sim(b, k, f):
        total = 0.0
        for n in range(tokens):
            y, h = teacher[b, k, n].double(), student[b, f, n].double()
            total += float(torch.dot(y, h) / (y.norm() * h.norm()))
        return total / tokens

    offsets = [] if distance == 0 else (list(range(1, distance + 1)) if cumulative else [distance])
    loss_sum, self_sum, bracket_sum = 0.0, 0.0, 0.0
    for b in range(batch):
        s_b = 0.0
        for f in range(frames):
            own = sim(b, f, f)
            bracket, weight_total = own, 1.0
            for o in offsets:
                for k in (f - o, f + o):
                    if 0 <= k < frames:
                        w = math.exp(-abs(k - f) / tau)
                        bracket += w * sim(b, k, f)
                        weight_total += w
            if normalize_weights:
                bracket /= weight_total
            s_b += bracket
            self_sum += own
            bracket_sum += bracket
        loss_sum += s_b / (frames if normalize_by_frames else 1)
    count = batch * frames
    return -loss_sum / batch, self_sum / count, bracket_sum / count


@pytest.mark.parametrize("distance", [0, 1, 2, 3])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("frames", [1, 2, 5, 13])
def test_matches_naive_equation(distance, tau, cumulative, frames):
    gen = torch.Generator().manual_seed(distance * 1000 + frames * 10 + int(tau * 2) + cumulative)
    batch = int(torch.randint(1, 3, (1,), generator=gen))
    tokens = int(torch.randint(1, 5, (1,), generator=gen))
    dim = int(torch.randint(2, 6, (1,), generator=gen))
    student = torch.randn(batch, frames, tokens, dim, generator=gen)
    teacher = torch.randn(batch, frames, tokens, dim, generator=gen) * 3.0  # not unit length
    for normalize_by_frames in (True, False):
        result = cross_frame_alignment(
            student,
            teacher,
            distance=distance,
            tau=tau,
            cumulative=cumulative,
            normalize_by_frames=normalize_by_frames,
        )
        loss, sim_self, score = naive_crepa(student, teacher, distance, tau, cumulative, normalize_by_frames)
        assert result.loss.item() == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert result.sim_self.item() == pytest.approx(sim_self, rel=1e-5, abs=1e-6)
        assert result.score.item() == pytest.approx(score, rel=1e-5, abs=1e-6)


def test_normalize_weights_bounds_score_and_matches_reference():
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(2, 6, 3, 4, generator=gen)
    teacher = torch.randn(2, 6, 3, 4, generator=gen)
    result = cross_frame_alignment(student, teacher, distance=2, cumulative=True, normalize_weights=True)
    loss, _, score = naive_crepa(student, teacher, 2, 1.0, True, True, normalize_weights=True)
    assert result.loss.item() == pytest.approx(loss, rel=1e-5)
    assert result.score.item() == pytest.approx(score, rel=1e-5)
    # identical, frame-constant features: every cosine is 1, the raw bracket exceeds 1, the normalized one is 1
    same = torch.ones(1, 6, 3, 4)
    assert cross_frame_alignment(same, same, distance=1).score.item() > 1.0
    assert cross_frame_alignment(
        same, same, distance=1, normalize_weights=True
    ).score.item() == pytest.approx(1.0)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=gen)
    for distance, cumulative in [(0, False), (1, False), (2, True)]:
        torch.autograd.gradcheck(
            lambda s, d=distance, c=cumulative: (
                cross_frame_alignment(s, teacher, distance=d, cumulative=c).loss
            ),
            (student,),
        )


def test_teacher_is_constant_and_metrics_detached():
    student = torch.randn(1, 3, 2, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 4, requires_grad=True)
    result = cross_frame_alignment(student, teacher)
    result.loss.backward()
    assert student.grad is not None and teacher.grad is None
    assert not result.sim_self.requires_grad and not result.score.requires_grad


def test_bfloat16_student_is_reduced_in_float32():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(1, 5, 64, 32, generator=gen)
    teacher = torch.randn(1, 5, 64, 32, generator=gen)
    full = cross_frame_alignment(student, teacher).loss
    half = cross_frame_alignment(student.bfloat16(), teacher.bfloat16()).loss
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), abs=2e-3)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(B, F, N, D\)"):
        cross_frame_alignment(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="tau"):
        cross_frame_alignment(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), tau=0)


def test_projectors():
    mlp = build_projector("mlp", 12, 7, hidden_dim=16)
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 7)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in mlp) == 2
    linear = build_projector("linear", 12, 7)
    assert isinstance(linear[0], torch.nn.LayerNorm) and linear[1].out_features == 7
    assert build_projector("mlp", 12, 7, 16)(torch.randn(2, 3, 5, 12)).shape == (2, 3, 5, 7)
    with pytest.raises(ValueError, match="mlp"):
        build_projector("conv", 1, 1)


def test_tokens_to_grid_is_frame_then_row_major():
    frames, height, width = 3, 2, 4
    index = torch.arange(frames * height * width, dtype=torch.float32).view(1, -1, 1)
    grid = tokens_to_grid(index, (frames, height, width))
    for f in range(frames):
        for r in range(height):
            for c in range(width):
                assert grid[0, f, r, c, 0] == f * height * width + r * width + c
    with pytest.raises(ValueError, match="3x2x4"):
        tokens_to_grid(torch.zeros(1, 23, 1), (frames, height, width))


def test_resample_shrink_is_area_average():
    grid = torch.randn(2, 3, 4, 6, 5, dtype=torch.float64)
    out = resample_grid(grid, (2, 3))
    expected = grid.view(2, 3, 2, 2, 3, 2, 5).mean(dim=(3, 5))
    torch.testing.assert_close(out, expected)


def test_resample_grow_is_bilinear_per_axis_not_flattened():
    # a grid whose value is its column index: growing must keep columns separable (rows untouched)
    rows, cols = 3, 4
    grid = torch.arange(cols, dtype=torch.float64).view(1, 1, 1, cols, 1).expand(1, 1, rows, cols, 1)
    out = resample_grid(grid, (6, 8))
    # half-pixel bilinear: output column j samples input position (j + 0.5) / 2 - 0.5, clamped
    expected_cols = torch.tensor(
        [min(max((j + 0.5) / 2 - 0.5, 0.0), cols - 1) for j in range(8)], dtype=torch.float64
    )
    for r in range(6):
        torch.testing.assert_close(out[0, 0, r, :, 0], expected_cols)


def test_resample_mixed_shrink_and_grow():
    grid = torch.randn(1, 2, 4, 2, 3, dtype=torch.float64)
    out = resample_grid(grid, (2, 4))
    rows_averaged = grid.view(1, 2, 2, 2, 2, 3).mean(dim=3)  # area over rows first
    expected = torch.nn.functional.interpolate(
        rows_averaged.permute(0, 1, 4, 2, 3).reshape(2, 3, 2, 2),
        size=(2, 4),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(out, expected.view(1, 2, 3, 2, 4).permute(0, 1, 3, 4, 2))


@pytest.mark.parametrize("reduce", ["mean", "first", "last", "center"])
def test_latent_frame_features(reduce):
    ratio, groups = 4, 3
    features = torch.randn(2, 1 + ratio * groups, 2, 5, dtype=torch.float64)
    out = latent_frame_features(features, ratio, reduce)
    assert out.shape == (2, 1 + groups, 2, 5)
    torch.testing.assert_close(out[:, 0], features[:, 0])
    for f in range(1, groups + 1):
        members = features[:, ratio * (f - 1) + 1 : ratio * f + 1]
        expected = {
            "mean": members.mean(1),
            "first": members[:, 0],
            "last": members[:, -1],
            "center": members[:, ratio // 2],
        }[reduce]
        torch.testing.assert_close(out[:, f], expected)


def test_latent_frame_error_names_valid_lengths():
    with pytest.raises(ValueError, match=r"49 or 53"):
        latent_frame_features(torch.zeros(1, 50, 3), 4)
    assert latent_frame_features(torch.zeros(1, 1, 3), 4).shape == (1, 1, 3)


def test_schedule_shapes():
    warm = AlignmentSchedule(weight=1.0, warmup_steps=4)
    assert [warm.weight_at(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = AlignmentSchedule(weight=1.0, decay="linear", decay_steps=10, end_weight=0.2)
    assert lin.weight_at(0) == pytest.approx(1.0) and lin.weight_at(5) == pytest.approx(0.6)
    assert lin.weight_at(10) == pytest.approx(0.2) and lin.weight_at(50) == pytest.approx(0.2)
    cos = AlignmentSchedule(weight=1.0, decay="cosine", decay_steps=10)
    assert cos.weight_at(5) == pytest.approx(0.5)
    poly = AlignmentSchedule(weight=2.0, warmup_steps=2, decay="polynomial", decay_steps=4, power=2.0)
    assert poly.weight_at(4) == pytest.approx(2.0 * (1 - 2 / 4) ** 2)
    cut = AlignmentSchedule(weight=1.0, cutoff_step=3)
    assert [cut.weight_at(s) for s in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="decay"):
        AlignmentSchedule(weight=1.0, decay="exp")


@pytest.mark.parametrize("mode", ["permanent", "recoverable"])
def test_schedule_ema_cutoff_and_resume(mode):
    def run(schedule, scores, start=0):
        weights = []
        for i, score in enumerate(scores):
            weights.append(schedule.weight_at(start + i))
            schedule.update(torch.tensor(score))
        return weights

    scores = [0.2] * 4 + [0.9] * 8 + [0.1] * 30

    def make():
        return AlignmentSchedule(
            weight=1.0, ema_threshold=0.5, ema_decay=0.5, cutoff_mode=mode, ema_check_every=2
        )

    full = run(make(), scores)
    # reference EMA by hand: cut from the first check (every 2 updates) where ema > 0.5
    ema, expected, cut = None, [], False
    for i, score in enumerate(scores):
        expected.append(0.0 if cut else 1.0)
        ema = score if ema is None else 0.5 * ema + 0.5 * score
        if (i + 1) % 2 == 0:
            cut = (cut or ema > 0.5) if mode == "permanent" else ema > 0.5
    assert full == expected
    assert 0.0 in full
    assert (full[-1] == 1.0) == (mode == "recoverable")
    first = make()
    part = run(first, scores[:9])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert part + run(resumed, scores[9:], start=9) == full
