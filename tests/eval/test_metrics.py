"""Closed-form checks of the pure metrics: consistency formula, flicker, flow, warping error, motion, Frechet."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from crepa.eval.consistency import consistency_pair_scores, consistency_score
from crepa.eval.flicker import temporal_flickering
from crepa.eval.flow import (
    FLOW_METHODS,
    clip_motion,
    consistent_flow_mask,
    dynamic_frame_stride,
    dynamic_threshold,
    flow_magnitude,
    is_dynamic,
    optical_flow,
    top_magnitude,
    warp,
    warping_errors,
)
from crepa.eval.frechet import frechet_distance
from helpers import textured_image, translating_clip


def pixel_features(frames: np.ndarray) -> torch.Tensor:
    """A fixed tiny extractor: 8x8 area-averaged, mean-centred pixels per frame, (T, 192)."""
    small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), 8)
    flat = small.flatten(1)
    return flat - flat.mean(dim=1, keepdim=True)


# ---------------------------------------------------------------- consistency and flicker


def test_consistency_matches_the_vbench_formula_written_out():
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.2]], dtype=torch.float64)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    expected = []
    for t in range(1, 4):
        to_previous = max(0.0, cos(features[t - 1], features[t]))
        to_first = max(0.0, cos(features[0], features[t]))
        expected.append((to_previous + to_first) / 2)
    assert consistency_pair_scores(features).tolist() == pytest.approx(expected, abs=1e-12)
    # by hand: t=1: (1/sqrt2 + 1/sqrt2)/2; t=2: (1/sqrt2 + 0)/2; t=3: (0.2/sqrt(1.04) + clipped -0.98)/2
    assert expected == pytest.approx([1 / math.sqrt(2), 1 / (2 * math.sqrt(2)), 0.1 / math.sqrt(1.04)])
    assert consistency_score(features) == pytest.approx(sum(expected) / 3)


def test_identical_frames_give_consistency_and_flicker_of_one():
    frames = np.repeat(textured_image(32, 48)[None], 6, axis=0)
    assert consistency_score(pixel_features(frames)) == pytest.approx(1.0, abs=1e-9)
    assert temporal_flickering(frames) == 1.0


def test_flicker_of_alternating_frames_is_closed_form():
    frames = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    frames[1::2] = 10  # every consecutive pair differs by 10 everywhere
    assert temporal_flickering(frames) == pytest.approx((255 - 10) / 255)
    frames[4] = 255  # the last pair now differs by 255: mean abs diff = (10 * 3 + 245) / 4
    assert temporal_flickering(frames) == pytest.approx((255 - (30 + 245) / 4) / 255)


def test_consistency_rejects_a_single_frame():
    with pytest.raises(ValueError, match="T >= 2"):
        consistency_score(torch.ones(1, 4))


def test_shuffling_a_smooth_clip_lowers_consistency_and_raises_warping_error():
    clip = translating_clip(12, 48, 64, shift=(2, 1), blur=4.0)
    order = np.random.default_rng(3).permutation(len(clip))
    shuffled = clip[order]
    assert consistency_score(pixel_features(shuffled)) < consistency_score(pixel_features(clip)) - 0.05
    assert temporal_flickering(shuffled) < temporal_flickering(clip)
    smooth, mixed = clip_motion(clip, fps=8), clip_motion(shuffled, fps=8)
    assert mixed.warping_error > 10 * smooth.warping_error


# ---------------------------------------------------------------- flow and warping


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_flow_of_identical_frames_is_zero(method):
    frames = np.repeat(textured_image(40, 56)[None], 3, axis=0)
    magnitude = flow_magnitude(optical_flow(frames[:-1], frames[1:], method))
    assert magnitude[:, 4:-4, 4:-4].max() < 0.05  # Farneback wobbles by ~0.1 px at the very border
    motion = clip_motion(frames, fps=8, method=method)
    assert motion.flow_magnitude < 0.01
    assert motion.warping_error < 1e-6
    assert not motion.dynamic


@pytest.mark.parametrize("method", FLOW_METHODS)
@pytest.mark.parametrize("shift", [(3, -2), (0, 5), (-6, 0)])
def test_flow_of_an_integer_translation_equals_the_shift(method, shift):
    clip = translating_clip(5, 64, 80, shift)
    forward = optical_flow(clip[:-1], clip[1:], method)
    backward = optical_flow(clip[1:], clip[:-1], method)
    interior = (slice(None), slice(12, -12), slice(12, -12))
    expected = math.hypot(*shift)
    assert flow_magnitude(forward)[interior].mean() == pytest.approx(expected, rel=0.1)
    assert forward[interior].mean(axis=(0, 1, 2)) == pytest.approx(shift, abs=0.1 * expected)
    # away from the borders the next frame warped back onto the frame reproduces it
    warped, inside = warp(clip[1:].astype(np.float32) / 255, forward)
    squared = np.square(warped - clip[:-1].astype(np.float32) / 255).mean(-1)
    assert inside[interior].all()
    assert squared[interior].mean() < 1e-4
    assert warping_errors(clip[:-1], clip[1:], forward, backward).max() < 1e-4


def test_warp_by_an_integer_flow_is_a_shift():
    images = np.random.default_rng(0).random((2, 6, 7, 1)).astype(np.float32)
    flow = np.zeros((2, 6, 7, 2), dtype=np.float32)
    flow[..., 0], flow[..., 1] = 2, -1  # sample at (x + 2, y - 1)
    warped, inside = warp(images, flow)
    np.testing.assert_allclose(warped[:, 1:, :-2], images[:, :-1, 2:], atol=1e-6)
    assert inside[:, 1:, :-2].all()
    assert not inside[:, 0].any() and not inside[:, :, -2:].any()
    assert (warped[~inside] == 0).all()


def test_forward_backward_mask_flags_inconsistent_flow():
    forward = np.zeros((1, 10, 10, 2), dtype=np.float32)
    forward[..., 0] = 1.0
    backward = -forward
    mask = consistent_flow_mask(forward, backward)
    assert mask[:, :, :-1].all()  # consistent wherever the target pixel is inside
    assert not mask[:, :, -1].any()  # x + 1 leaves the frame
    assert not consistent_flow_mask(forward, forward)[:, :, :-1].any()  # |1 + 1|^2 > 0.01 * 2 + 0.5


def test_warping_error_is_mean_squared_difference_over_consistent_pixels():
    frames = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    following = np.full((1, 4, 4, 3), 51, dtype=np.uint8)  # 51 / 255 = 0.2
    still = np.zeros((1, 4, 4, 2), dtype=np.float32)
    assert warping_errors(frames, following, still, still) == pytest.approx([0.04])


def test_top_magnitude_and_dynamic_degree_rules():
    flow = np.zeros((2, 10, 10, 2), dtype=np.float32)
    flow[0, :, :, 0] = np.arange(100).reshape(10, 10)  # magnitudes 0..99; top 5% = 95..99
    flow[1, 0, :5, 1] = -8.0  # 5 pixels of length 8
    assert top_magnitude(flow) == pytest.approx([97.0, 8.0])
    assert dynamic_threshold(256, 512) == 6.0
    assert dynamic_threshold(480, 720) == pytest.approx(6.0 * 480 / 256)
    assert [dynamic_frame_stride(fps) for fps in (0, 8, 12, 16, 24, 30)] == [1, 1, 2, 2, 3, 4]
    # 16 frames need round(4 * 16 / 16) = 4 pairs above the threshold
    above, below = 7.0, 5.0
    assert is_dynamic(np.array([above] * 4 + [below] * 11), 256, 256, 16)
    assert not is_dynamic(np.array([above] * 3 + [below] * 12), 256, 256, 16)
    assert is_dynamic(np.array([below]), 256, 256, 2)  # VBench: 2 frames need round(0.5) = 0 pairs
    assert not is_dynamic(np.array([]), 256, 256, 1)


def test_dynamic_degree_uses_about_eight_frames_per_second():
    # 2 px per frame at 24 fps: VBench keeps every 3rd frame, so pairs move 6 px; threshold at a
    # 128-pixel short side is 3 px. At 8 fps the same clip moves 2 px per pair: not dynamic.
    clip = translating_clip(25, 128, 128, shift=(2, 0))
    assert clip_motion(clip, fps=24).dynamic
    assert not clip_motion(clip, fps=8).dynamic
    assert clip_motion(clip, fps=24).flow_magnitude == pytest.approx(2.0, rel=0.1)


# ---------------------------------------------------------------- Frechet distance


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)) written out with float64 scipy."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    cov_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def eigen_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance through tr((S_a S_b)^(1/2)) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def test_frechet_matches_float64_references_on_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    mixing = rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(400, 6)) @ mixing
    value = frechet_distance(a.astype(np.float32), b.astype(np.float32))
    assert value == pytest.approx(reference_frechet(a, b), rel=1e-5)
    assert value == pytest.approx(eigen_frechet(a, b), rel=1e-5)
    assert value > 1.0


def test_frechet_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(1).normal(size=(300, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_of_known_gaussians_approaches_the_closed_form():
    # N(0, I) vs N(m, 4 I) in 3-D: |m|^2 + 3 * (1 - 2)^2
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(loc=[1.0, 2.0, 0.0], scale=2.0, size=(20000, 3))
    assert frechet_distance(a, b) == pytest.approx(5.0 + 3.0, rel=0.03)


def test_frechet_warns_under_256_clips_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    with pytest.warns(UserWarning, match="unstable"):
        frechet_distance(rng.normal(size=(40, 4)), rng.normal(size=(300, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(rng.normal(size=(256, 4)), rng.normal(size=(256, 4)))
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(np.zeros((300, 4)), np.zeros((300, 5)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((300, 4), np.nan), np.zeros((300, 4)))


def test_frechet_with_fewer_clips_than_dimensions_stays_finite():
    rng = np.random.default_rng(4)
    with pytest.warns(UserWarning):
        value = frechet_distance(rng.normal(size=(5, 32)), rng.normal(size=(6, 32)))
    assert np.isfinite(value) and value > 0
