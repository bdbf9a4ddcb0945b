"""CKNNA: kernel alignment restricted to mutual nearest neighbours (Huh et al. 2024, used by REPA/CREPA).

Kernels K = A A^T and L = B B^T over L2-normalised rows. The cross term keeps only pairs (i, j),
i != j, where j is among the k nearest neighbours of i in both kernels (the mutual mask); each
self term keeps each kernel's own k nearest neighbours, as the reference code of the Platonic
Representation Hypothesis does:

    CKNNA = HSIC(M K, M L) / sqrt(HSIC(M_K K, M_K K) HSIC(M_L L, M_L L)),  M = M_K * M_L,

with the unbiased HSIC estimator. Masking the self terms with the mutual mask M as well would
make the score about 0.99 for independent features (the masked kernels then share the same
sparsity pattern whatever the features), so it is not done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unbiased_hsic(kernel_k: torch.Tensor, kernel_l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) kernels, n >= 4; diagonals are ignored.

    1/(n(n-3)) [tr(K L) + (1'K1)(1'L1)/((n-1)(n-2)) - 2/(n-2) 1'K L 1], K and L with zeroed diagonals.
    """
    n = kernel_k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    k = kernel_k.clone().fill_diagonal_(0)
    l = kernel_l.clone().fill_diagonal_(0)  # noqa: E741 (the kernel's name in the literature)
    trace_kl = (k * l.T).sum()
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = k.sum(0) @ l.sum(1)
    return (trace_kl + sums - 2 * cross / (n - 2)) / (n * (n - 3))


def knn_mask(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """bool (n, n): True at (i, j) when j != i is among the k largest entries of row i."""
    n = kernel.shape[0]
    scores = kernel.clone().fill_diagonal_(float("-inf"))
    neighbours = scores.topk(k, dim=1).indices
    return torch.zeros(n, n, dtype=torch.bool, device=kernel.device).scatter_(1, neighbours, True)


def cknna(features_a: torch.Tensor, features_b: torch.Tensor, k: int = 10) -> float:
    """CKNNA of two representations of the same n samples: (n, D_a) and (n, D_b) -> a score <= 1.

    1 for identical features (up to row scaling), about 0 for independent ones; NaN when a self
    term is not positive (too few samples).
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[0] != features_b.shape[0]:
        raise ValueError(
            "CKNNA needs two feature matrices over the same samples, (n, D_a) and (n, D_b); got "
            f"{tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    n = features_a.shape[0]
    if not 1 <= k <= n - 2:
        raise ValueError(
            f"k must be in 1..n-2 = {n - 2} for {n} samples, got {k}; use more samples or a smaller k"
        )
    a = F.normalize(features_a.double(), dim=-1)
    b = F.normalize(features_b.double(), dim=-1)
    kernel_k, kernel_l = a @ a.T, b @ b.T
    near_k, near_l = knn_mask(kernel_k, k), knn_mask(kernel_l, k)
    mutual = near_k & near_l
    cross = unbiased_hsic(kernel_k * mutual, kernel_l * mutual)
    masked_k, masked_l = kernel_k * near_k, kernel_l * near_l
    self_product = unbiased_hsic(masked_k, masked_k) * unbiased_hsic(masked_l, masked_l)
    if self_product <= 0:
        return float("nan")
    return float(cross / self_product.sqrt())
