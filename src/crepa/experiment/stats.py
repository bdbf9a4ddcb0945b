"""Multiple-testing corrections, the equivalence test and the motion adjustment of ``crepa
experiment``'s verdict (pure numbers, no I/O; every function works on NumPy arrays, the p-value ones
along the last axis, so a simulation of many experiments runs in one call).

- Holm-Bonferroni (family-wise error): sort the m p-values, p_(1) <= ... <= p_(m); the adjusted value of
  p_(i) is max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting where it is below a controls the probability
  of any false rejection at a, whatever the dependence between the tests.
- Benjamini-Hochberg (false discovery rate): the q-value of p_(i) is min_{j >= i} min(1, m p_(j) / j).
- TOST (two one-sided tests) for equivalence within a margin m: H0 |mean| >= m is rejected at a when both
  one-sided t-tests (mean > -m and mean < m) reject, which is when the (1 - 2a) t interval lies inside
  (-m, m).
- Motion adjustment: a per-clip metric regressed on the clip's flow magnitude (least squares with an
  intercept, pooled over every clip given); the residuals are the metric at matched motion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05


def paired_t_p_values(differences: np.ndarray) -> np.ndarray:
    """Two-sided paired t-test p-values (H0: mean 0) of ``differences`` (..., n) along the last axis
    (n >= 2). Zero spread gives 0 for a non-zero mean and 1 for a zero mean (scipy gives NaN there)."""
    values = np.asarray(differences, dtype=np.float64)
    mean, sd = values.mean(-1), sample_sd(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = mean / (sd / np.sqrt(values.shape[-1]))
    p = 2 * stats.t.sf(np.abs(statistic), values.shape[-1] - 1)
    return np.where(sd == 0.0, np.where(mean == 0.0, 1.0, 0.0), p)


def holm_adjusted(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values along the last axis (same shape). Hand-written: scipy has no Holm
    (its ``false_discovery_control`` covers BH and BY only) and statsmodels is not a dependency."""
    p = np.asarray(p_values, dtype=np.float64)
    count = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    scaled = np.minimum(1.0, (count - np.arange(count)) * np.take_along_axis(p, order, -1))
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.maximum.accumulate(scaled, axis=-1), -1)
    return adjusted


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values along the last axis (scipy's ``false_discovery_control``)."""
    p = np.asarray(p_values, dtype=np.float64)
    return p.copy() if p.shape[-1] == 0 else stats.false_discovery_control(p, axis=-1, method="bh")


@dataclass(frozen=True)
class Equivalence:
    """TOST of one set of paired differences against the margin ±``margin``: the larger of the two
    one-sided p-values and the (1 - 2 alpha) t interval; ``equivalent`` when that p is below alpha."""

    margin: float
    alpha: float
    p_value: float
    interval: tuple[float, float]

    @property
    def equivalent(self) -> bool:
        return self.p_value < self.alpha

    def record(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "method": f"TOST (two one-sided paired t-tests) at {self.alpha:g}",
            "p_value": self.p_value,
            "interval": list(self.interval),
            "interval_confidence": round(1 - 2 * self.alpha, 12),
            "outcome": "within margin" if self.equivalent else "undecided",
        }


def tost(differences: np.ndarray, margin: float, alpha: float = ALPHA) -> Equivalence | None:
    """Equivalence test of the mean of ``differences`` (n,) within ±``margin`` (scipy's one-sided
    ``ttest_1samp`` against each bound); None with fewer than two values. Zero spread: equivalent
    exactly when |mean| < margin."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size < 2:
        return None
    mean = float(values.mean())
    if sample_sd(values) == 0.0:
        return Equivalence(margin, alpha, 0.0 if abs(mean) < margin else 1.0, (mean, mean))
    above = stats.ttest_1samp(values, -margin, alternative="greater")
    below = stats.ttest_1samp(values, margin, alternative="less")
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(1 - 2 * alpha)
    p_value = float(max(above.pvalue, below.pvalue))
    return Equivalence(margin, alpha, p_value, (float(interval.low), float(interval.high)))


def motion_residuals(values: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, float]:
    """Residuals of the least-squares line values ~ a + b * flow over every clip given (both (N,)), and
    the slope b. Flow without spread explains nothing: the residuals are then values - mean, b = 0."""
    values, flow = np.asarray(values, dtype=np.float64), np.asarray(flow, dtype=np.float64)
    if sample_sd(flow) == 0.0:
        return values - values.mean(), 0.0
    fit = stats.linregress(flow, values)
    return values - (fit.intercept + fit.slope * flow), float(fit.slope)


def sample_sd(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation (ddof 1) along the last axis, exactly 0 where all values are equal."""
    values = np.asarray(values, dtype=np.float64)
    sd = values.std(-1, ddof=1)
    return np.where(values.min(-1) == values.max(-1), 0.0, sd)
