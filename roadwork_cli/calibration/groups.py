"""Certification when calibration images come in groups (clips, bursts, near-duplicates): the group is the unit.

Frames of one dashcam clip share their label and much of their score, so counting them as independent draws certifies
far more than the data supports. Here the val_calib groups are the independent draws, and what is certified is still
the frame-level promise: the FNR among exited frames and the share of frames that exit.

Notation for one hypothesis (a grid value and a tau), over the G groups of val_calib: group j has s_j frames, e_j of
them exit, m_j exited positives and k_j misses among those; c = max s_j (the largest group).

* **Risk.** The frame-level FNR on exits is E[k_j] / E[m_j]. Among the G+ groups with m_j > 0 (given their number
  they are i.i.d. draws of such groups), the loss w_j = (k_j - alpha m_j) / c + alpha lies in [0, 1] and
  E[w] > alpha exactly when the FNR exceeds alpha. H0: E[w] > alpha is tested with the Hoeffding-Bentkus p-value of
  the mean of G+ bounded losses. The sum of the w_j needs only the totals: (K - alpha M) / c + alpha G+.
* **Coverage.** The frame-level exit rate is E[e_j] / E[s_j]; v_j = (e_j - xi s_j) / c + xi lies in [0, 1] and
  E[v] < xi exactly when the exit rate is below xi. H0: E[v] < xi is tested on 1 - v the same way.

With every group a single image (c = 1) the risk loss is the 0/1 miss of one exited positive: the image-level exact
binomial test is the sharper one there, and callers use it. A group of s frames that all exit counts as one image
does, which is what a strong shared clip effect leaves of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GroupIndex",
    "coverage_lower_bound",
    "coverage_pvalues",
    "fixed_sequence_prefix",
    "groups_entered",
    "hoeffding_bentkus_pvalue",
    "risk_pvalues",
    "risk_upper_bound",
]


@dataclass(frozen=True)
class GroupIndex:
    """Which group each val_calib image belongs to.

    Attributes:
        index: (n,) group number of every image, 0 .. count - 1.
        count: Number of groups G.
        largest: Frames in the largest group, c.
    """

    index: np.ndarray
    count: int
    largest: int

    @classmethod
    def from_labels(cls, labels) -> GroupIndex:
        """Groups from any per-image labels (clip ids, file stems); a missing label (None, "") is its own group."""
        keys = ["" if label is None else str(label) for label in labels]
        own = [f"\0{i}" if key in ("", "nan", "None") else key for i, key in enumerate(keys)]
        _, index = np.unique(np.asarray(own, dtype=object), return_inverse=True)
        index = index.astype(np.int64).reshape(-1)
        sizes = np.bincount(index) if index.size else np.zeros(0, dtype=np.int64)
        return cls(index=index, count=int(sizes.size), largest=int(sizes.max()) if sizes.size else 0)

    @property
    def singletons(self) -> bool:
        """Every group is one image: the image-level statistics apply unchanged."""
        return self.largest <= 1


def groups_entered(entry, groups: GroupIndex, taus) -> np.ndarray:
    """For every tau, how many groups hold at least one image whose ``entry`` is below tau.

    ``entry`` is the tau above which an image counts (an exited positive under the rule at this grid value):
    -inf for always, +inf for never. Shape (T,).
    """
    entry = np.asarray(entry, dtype=float).reshape(-1)
    first = np.full(groups.count, np.inf)
    np.minimum.at(first, groups.index, entry)
    return np.searchsorted(np.sort(first), np.asarray(taus, dtype=float), side="left")


def _kl_bernoulli(a: np.ndarray, b: float) -> np.ndarray:
    """KL(Bernoulli(a) || Bernoulli(b)), elementwise in a (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(a > 0, a * np.log(a / b), 0.0)
        second = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return first + second


def hoeffding_bentkus_pvalue(total_loss, n, rate: float) -> np.ndarray:
    """p-value of H0: mean loss > rate, from the sum of n i.i.d. losses in [0, 1].

    The smaller of Hoeffding's bound exp(-n KL(mean ∧ rate || rate)) and Bentkus's e P(Bin(n, rate) <= ceil(sum)),
    as in Learn-then-Test (1 where n = 0).
    """
    from scipy.special import bdtr

    total, n = np.broadcast_arrays(np.asarray(total_loss, dtype=float), np.asarray(n, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), 1.0)
    hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(mean, rate), rate))
    # The sums are multiples of 1/c computed in floats: round before the ceiling so 3.0000000001 stays 3.
    events = np.ceil(np.round(np.maximum(total, 0.0), 9))
    bentkus = math.e * bdtr(events, n, rate)
    return np.where(n > 0, np.minimum(np.minimum(hoeffding, bentkus), 1.0), 1.0)


def risk_pvalues(misses, exited_positives, positive_groups, largest: int, alpha: float) -> np.ndarray:
    """p-values of H0: frame-level FNR on exits > alpha, per tau (module doc).

    Args:
        misses: (T,) exited positives decided no_roadwork, K(tau).
        exited_positives: (T,) or scalar M(tau).
        positive_groups: (T,) or scalar G+(tau), groups with at least one exited positive.
        largest: c, frames in the largest group.
        alpha: FNR target.
    """
    arrays = (np.asarray(a, dtype=float) for a in (misses, exited_positives, positive_groups))
    k, m, g_pos = np.broadcast_arrays(*arrays)
    total = (k - alpha * m) / largest + alpha * g_pos
    return hoeffding_bentkus_pvalue(total, g_pos, alpha)


def coverage_pvalues(exits, frames: int, groups: int, largest: int, xi: float) -> np.ndarray:
    """p-values of H0: frame-level exit rate < xi, per tau, from the exited frames E(tau) of n frames in G groups."""
    exits = np.asarray(exits, dtype=float)
    total_v = (exits - xi * frames) / largest + xi * groups
    return hoeffding_bentkus_pvalue(groups - total_v, np.full(exits.shape, float(groups)), 1.0 - xi)


def fixed_sequence_prefix(pvalues, level: float) -> int:
    """How many leading hypotheses a fixed sequence rejects at ``level`` (it stops at the first p-value above)."""
    rejected = np.asarray(pvalues) <= level
    return int(np.argmin(rejected)) if not rejected.all() else int(rejected.size)


def _invert(pvalue_at, level: float, rejects_low: bool) -> float:
    """The boundary rate in [0, 1] where ``pvalue_at(rate) <= level`` starts to hold (bisection to 1e-6).

    ``rejects_low``: the hypothesis is rejected for rates below the boundary (coverage); else above it (risk).
    """
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        rejected = pvalue_at(mid) <= level
        if rejected == rejects_low:
            lo = mid
        else:
            hi = mid
    return hi if not rejects_low else lo


def risk_upper_bound(misses: int, exited_positives: int, positive_groups: int, largest: int, level: float) -> float:
    """Pointwise upper confidence bound on the frame-level FNR on exits: the smallest alpha rejected at ``level``."""
    if positive_groups <= 0:
        return 1.0
    return _invert(
        lambda a: float(risk_pvalues(misses, exited_positives, positive_groups, largest, min(max(a, 1e-12), 1.0))),
        level,
        rejects_low=False,
    )


def coverage_lower_bound(exits: int, frames: int, groups: int, largest: int, level: float) -> float:
    """Pointwise lower confidence bound on the frame-level exit rate: the largest xi rejected at ``level``."""
    if groups <= 0:
        return 0.0
    return _invert(
        lambda x: float(coverage_pvalues(np.array([exits]), frames, groups, largest, min(max(x, 1e-12), 1 - 1e-12))[0]),
        level,
        rejects_low=True,
    )
