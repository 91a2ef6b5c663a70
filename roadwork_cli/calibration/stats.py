"""Exact statistics behind the guarantee: binomial p-values, Clopper-Pearson bounds, DKW slack, sample sizes.

numpy/scipy.special only (``scipy.stats`` is slow to import and the statistical tests call these thousands of times).
"""

from __future__ import annotations

import math

import numpy as np

from roadwork_cli.errors import UsageError


def binomial_pvalue(k, m, alpha: float) -> np.ndarray:
    """Exact p-value of H0: rate > alpha after k events in m trials: P(Bin(m, alpha) <= k) (1 when m = 0)."""
    # scipy.special.bdtr is the ufunc behind scipy.stats.binom.cdf, minus the distribution-object overhead.
    from scipy.special import bdtr

    k, m = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(m, dtype=float))
    return np.where(m > 0, bdtr(k, m, alpha), 1.0)


def clopper_pearson_upper(k, m, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: the rate is below it with probability >= 1 - level (1 if k = m).

    The bound is pointwise: it holds for one (k, m) fixed in advance, not for one picked after looking at the data.
    """
    # betaincinv(a, b, q) is scipy.stats.beta.ppf(q, a, b) without importing scipy.stats.
    from scipy.special import betaincinv

    k, m = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(m, dtype=float))
    out = np.ones(k.shape, dtype=float)
    ok = k < m
    out[ok] = betaincinv(k[ok] + 1, m[ok] - k[ok], 1.0 - level)
    return out


def clopper_pearson_lower(k, m, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: the rate is above it with probability >= 1 - level (0 if k = 0)."""
    from scipy.special import betaincinv

    k, m = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(m, dtype=float))
    out = np.zeros(k.shape, dtype=float)
    ok = k > 0
    out[ok] = betaincinv(k[ok], m[ok] - k[ok] + 1, level)
    return out


def check_delta_split(delta: float, delta_coverage_share: float) -> tuple[float, float]:
    """(delta1, delta2) = (share * delta, delta - delta1), refusing delta1 > 1/2.

    Raises:
        UsageError: The one-sided DKW/Massart constant sqrt(ln(1/delta1) / (2n)) is only valid for delta1 <= 1/2.
    """
    delta1 = delta_coverage_share * delta
    if delta1 > 0.5:
        raise UsageError(
            f"calibration.delta_coverage_share * calibration.delta = {delta1:g} exceeds 1/2; the one-sided DKW "
            "coverage bound only holds for delta1 <= 1/2. Lower calibration.delta or calibration.delta_coverage_share."
        )
    return delta1, delta - delta1


def dkw_slack(n: int, delta1: float) -> float:
    """One-sided DKW/Massart deviation: sup_lambda (empirical - true exit rate) <= this w.p. >= 1 - delta1."""
    return math.sqrt(math.log(1.0 / delta1) / (2.0 * n)) if n > 0 else float("inf")


def positives_needed(alpha: float, delta: float, delta_coverage_share: float, grid_size: int) -> int:
    """Fewest exited calibration positives that can certify FNR <= alpha at all.

    Even with zero misses, H0: FNR > alpha is rejected only when (1 - alpha)^m <= delta2 / |G|, the Bonferroni level
    of one grid point; this returns the smallest such m.

    Args:
        alpha: FNR target among exits.
        delta: Total failure probability.
        delta_coverage_share: Share of delta spent on coverage (delta2 = (1 - share) * delta is spent on risk).
        grid_size: Number of lambda (gate rule) or b (band rule) values.

    Example:
        >>> positives_needed(0.02, 0.1, 0.5, 10)
        263
    """
    level = (1.0 - delta_coverage_share) * delta / grid_size
    m = max(math.ceil(math.log(level) / math.log1p(-alpha)), 0)
    # Guard the float rounding of the log ratio in both directions.
    while m > 0 and (1.0 - alpha) ** (m - 1) <= level:
        m -= 1
    while (1.0 - alpha) ** m > level:
        m += 1
    return m
