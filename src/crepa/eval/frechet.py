"""Frechet distance between two feature distributions (the FID / FVD formula), in float64."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

# Below this many clips per set the covariance estimate (and so the distance) is unstable.
MIN_STABLE_CLIPS = 256


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two sets of features (N, D) and (M, D).

    Warns when either set has fewer than 256 clips. When the square root of the covariance product
    is not finite or not real (singular covariances), ``eps`` is added to both diagonals (the usual
    FID fallback).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected two feature sets (N, D) and (M, D) of one width, got {a.shape} and {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinity; check the extractor's output")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"need at least 2 clips per set for a covariance, got {len(a)} and {len(b)}")
    if min(len(a), len(b)) < MIN_STABLE_CLIPS:
        warnings.warn(
            f"Frechet distance on {len(a)} and {len(b)} clips: below {MIN_STABLE_CLIPS} clips per set "
            "the value is unstable; compare runs only at equal, large clip counts",
            stacklevel=2,
        )
    mean_diff = a.mean(0) - b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_product = _sqrtm_real(cov_a @ cov_b)
    if sqrt_product is None:
        offset = eps * np.eye(cov_a.shape[0])
        sqrt_product = _sqrtm_real((cov_a + offset) @ (cov_b + offset))
    if sqrt_product is None:
        raise ValueError(
            "the covariance product has no real square root even with a diagonal offset; "
            "use more clips or features of fewer dimensions"
        )
    distance = mean_diff @ mean_diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrt_product)
    return float(max(distance, 0.0))


def _sqrtm_real(matrix: np.ndarray) -> np.ndarray | None:
    """Real part of the principal square root, or None when it is not finite or markedly complex."""
    root = scipy.linalg.sqrtm(matrix)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        if np.abs(root.imag).max() > 1e-3 * max(1.0, np.abs(root.real).max()):
            return None
        root = root.real
    return root
