"""CKNNA and the unbiased HSIC against naive loop references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from crepa.eval.cknna import cknna, knn_mask, unbiased_hsic


def naive_unbiased_hsic(x: list[list[float]], y: list[list[float]]) -> float:
    """Song et al.'s estimator written as loops over entries, diagonals ignored."""
    n = len(x)
    off = [[x[i][j] if i != j else 0.0 for j in range(n)] for i in range(n)]
    offy = [[y[i][j] if i != j else 0.0 for j in range(n)] for i in range(n)]
    trace = sum(off[i][j] * offy[j][i] for i in range(n) for j in range(n))
    sum_x = sum(map(sum, off))
    sum_y = sum(map(sum, offy))
    cross = sum(off[i][j] * offy[j][m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sum_x * sum_y / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def naive_cknna(a: np.ndarray, b: np.ndarray, k: int, self_terms: str = "own") -> float:
    """Cross term on the mutual k-NN mask; self terms on each kernel's own mask ("own") or on the
    mutual mask ("mutual", the literal reading of SPEC section 4, shown below to be degenerate)."""
    n = len(a)

    def kernel(features: np.ndarray) -> list[list[float]]:
        rows = [
            row / math.sqrt(sum(v * v for v in row)) for row in features.tolist() for row in [np.array(row)]
        ]
        return [
            [float(sum(p * q for p, q in zip(rows[i], rows[j], strict=True))) for j in range(n)]
            for i in range(n)
        ]

    def neighbours(matrix: list[list[float]]) -> list[set[int]]:
        return [
            set(sorted((j for j in range(n) if j != i), key=lambda j: -matrix[i][j])[:k]) for i in range(n)
        ]

    def masked(matrix: list[list[float]], keep: list[list[bool]]) -> list[list[float]]:
        return [[matrix[i][j] if keep[i][j] else 0.0 for j in range(n)] for i in range(n)]

    kk, ll = kernel(a), kernel(b)
    near_k, near_l = neighbours(kk), neighbours(ll)
    mutual = [[j in near_k[i] and j in near_l[i] for j in range(n)] for i in range(n)]
    own_k = [[j in near_k[i] for j in range(n)] for i in range(n)]
    own_l = [[j in near_l[i] for j in range(n)] for i in range(n)]
    mask_k, mask_l = (mutual, mutual) if self_terms == "mutual" else (own_k, own_l)
    cross = naive_unbiased_hsic(masked(kk, mutual), masked(ll, mutual))
    self_k = naive_unbiased_hsic(masked(kk, mask_k), masked(kk, mask_k))
    self_l = naive_unbiased_hsic(masked(ll, mask_l), masked(ll, mask_l))
    return cross / math.sqrt(self_k * self_l)


def test_unbiased_hsic_equals_the_u_statistic_for_symmetric_kernels():
    # Song et al. 2012: the estimator is the U-statistic of K_ij L_ij + K_ij L_qr - 2 K_ij L_iq
    # over ordered quadruples of distinct indices.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    kx, ky = x @ x.T, np.tanh(y @ y.T)
    n = len(x)
    total = sum(
        kx[i, j] * ky[i, j] + kx[i, j] * ky[q, r] - 2 * kx[i, j] * ky[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    )
    expected = total / (n * (n - 1) * (n - 2) * (n - 3))
    assert float(unbiased_hsic(torch.from_numpy(kx), torch.from_numpy(ky))) == pytest.approx(
        expected, rel=1e-10
    )


def test_unbiased_hsic_equals_the_loop_reference_on_asymmetric_kernels():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    value = float(unbiased_hsic(torch.from_numpy(x), torch.from_numpy(y)))
    assert value == pytest.approx(naive_unbiased_hsic(x.tolist(), y.tolist()), rel=1e-10)


def test_knn_mask_excludes_self_and_keeps_k_per_row():
    kernel = torch.tensor(
        [[9.0, 1.0, 3.0, 2.0], [1.0, 9.0, 0.0, 5.0], [3.0, 0.0, 9.0, 4.0], [2.0, 5.0, 4.0, 9.0]]
    )
    expected = torch.tensor(
        [
            [False, False, True, True],
            [True, False, False, True],
            [True, False, False, True],
            [False, True, True, False],
        ]
    )
    assert torch.equal(knn_mask(kernel, 2), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cknna_equals_the_naive_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(14, 5))
    b = a @ rng.normal(size=(5, 3)) + 0.8 * rng.normal(size=(14, 3))  # related, not identical
    value = cknna(torch.from_numpy(a).float(), torch.from_numpy(b).float(), k=4)
    assert value == pytest.approx(naive_cknna(a, b, k=4), rel=1e-5)


def test_cknna_of_identical_features_is_one():
    a = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-12)
    # rows are L2-normalised, so rescaling them keeps the score at 1
    assert cknna(a, 3.0 * a) == pytest.approx(1.0, abs=1e-9)


def test_cknna_of_independent_features_is_near_zero():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 32, generator=generator), torch.randn(500, 32, generator=generator)
    assert abs(cknna(a, b)) < 0.05
    # with the mutual mask in the self terms too, independent features would score close to 1
    small_a, small_b = a[:40].double().numpy(), b[:40].double().numpy()
    assert naive_cknna(small_a, small_b, k=10, self_terms="mutual") > 0.7
    assert abs(naive_cknna(small_a, small_b, k=10)) < 0.3


def test_cknna_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same samples"):
        cknna(torch.randn(10, 4), torch.randn(11, 4))
    with pytest.raises(ValueError, match="smaller k"):
        cknna(torch.randn(10, 4), torch.randn(10, 4), k=10)
