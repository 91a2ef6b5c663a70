"""Selective-prediction metrics: risk-coverage curves, AURC, operating-point rates on exits, set sizes.

Conventions: ``scores`` is a selection score (higher = more confident, exits first), ``losses`` is a per-sample loss
in [0, 1] (usually 0/1 error of the decision). Tied scores are grouped: a threshold either takes the whole tied group
or none of it, and AURC averages over random tie-breaking exactly, so no result depends on input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RiskCoverageCurve:
    """Points of the risk-coverage curve, one per distinct score (highest first).

    Attributes:
        thresholds: Score threshold of each point; a sample is selected iff score >= threshold.
        coverage: Fraction of samples selected at each threshold (increasing).
        risk: Mean loss of the selected samples at each threshold.
    """

    thresholds: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds non-finite values")
    return array


def _grouped(scores, losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending), their group sizes and summed losses."""
    scores = _as_1d(scores, "scores")
    losses = _as_1d(losses, "losses")
    if scores.shape != losses.shape:
        raise ValueError(f"scores and losses differ in length: {scores.size} vs {losses.size}")
    if scores.size == 0:
        raise ValueError("risk-coverage metrics need at least one sample")
    # np.unique sorts ascending; reverse so that the most confident group comes first.
    unique, inverse = np.unique(scores, return_inverse=True)
    counts = np.bincount(inverse, minlength=unique.size)
    loss_sums = np.bincount(inverse, weights=losses, minlength=unique.size)
    return unique[::-1], counts[::-1], loss_sums[::-1]


def risk_coverage_curve(scores, losses) -> RiskCoverageCurve:
    """The risk-coverage curve with one point per distinct score.

    Args:
        scores: Selection scores, shape (N,).
        losses: Per-sample losses, shape (N,).
    """
    unique, counts, loss_sums = _grouped(scores, losses)
    selected = np.cumsum(counts)
    return RiskCoverageCurve(thresholds=unique, coverage=selected / selected[-1], risk=np.cumsum(loss_sums) / selected)


def aurc(scores, losses) -> float:
    """Area under the risk-coverage curve (Geifman et al.): mean selective risk over the N coverage levels k/N.

    Inside a tied group the cumulative loss of the top k is its expectation under random tie-breaking (linear in k),
    which makes the value independent of the input order.
    """
    unique, counts, loss_sums = _grouped(scores, losses)
    n = int(counts.sum())
    group_end = np.cumsum(counts)  # (G,)
    group_start = group_end - counts
    loss_before = np.cumsum(loss_sums) - loss_sums
    k = np.arange(1, n + 1)  # (N,)
    group = np.searchsorted(group_end, k, side="left")  # the group holding the k-th sample
    cumulative = loss_before[group] + (k - group_start[group]) * (loss_sums[group] / counts[group])
    return float(np.mean(cumulative / k))


def optimal_aurc(losses) -> float:
    """AURC of an oracle that selects the lowest-loss samples first."""
    losses = _as_1d(losses, "losses")
    ordered = np.sort(losses)
    k = np.arange(1, losses.size + 1)
    return float(np.mean(np.cumsum(ordered) / k))


def e_aurc(scores, losses) -> float:
    """Excess AURC: AURC minus the oracle's AURC (0 = perfect ranking)."""
    return aurc(scores, losses) - optimal_aurc(losses)


def risk_at_coverage(scores, losses, coverage: float) -> float:
    """Selective risk at the first curve point whose coverage reaches ``coverage`` (whole tied groups only)."""
    curve = risk_coverage_curve(scores, losses)
    index = int(np.searchsorted(curve.coverage, coverage - 1e-12, side="left"))
    return float(curve.risk[min(index, curve.risk.size - 1)])


def coverage_at_risk(scores, losses, risk: float) -> float:
    """Largest coverage whose selective risk is at most ``risk`` (0 when no curve point qualifies)."""
    curve = risk_coverage_curve(scores, losses)
    ok = curve.risk <= risk + 1e-12
    return float(curve.coverage[ok].max()) if ok.any() else 0.0


def coverage(exits) -> float:
    """Fraction of samples that exit stage 1."""
    exits = np.asarray(exits, dtype=bool)
    return float(exits.mean()) if exits.size else float("nan")


def rate(numerator: int, denominator: int) -> float:
    """``numerator / denominator`` as a float; NaN when the denominator is 0 (the rate is undefined, not 0)."""
    return float(numerator / denominator) if denominator else float("nan")


def fnr_counts(labels, predictions, exits) -> tuple[int, int]:
    """(misses k, exited positives m): #(y=1, pred=0, exit) and #(y=1, exit), the counts behind FNR on exits."""
    labels, predictions, exits = (np.asarray(a) for a in (labels, predictions, exits))
    positives = (labels == 1) & exits.astype(bool)
    return int(np.sum(positives & (predictions == 0))), int(positives.sum())


def fnr_on_exits(labels, predictions, exits) -> float:
    """Missed roadwork among exited positives: #(y=1, pred=0, exit) / #(y=1, exit); NaN when no positive exits."""
    return rate(*fnr_counts(labels, predictions, exits))


def fpr_on_exits(labels, predictions, exits) -> float:
    """False alarms among exited negatives: #(y=0, pred=1, exit) / #(y=0, exit); NaN when no negative exits."""
    labels, predictions, exits = (np.asarray(a) for a in (labels, predictions, exits))
    negatives = (labels == 0) & exits.astype(bool)
    return rate(int(np.sum(negatives & (predictions == 1))), int(negatives.sum()))


def accuracy_on_exits(labels, predictions, exits) -> float:
    """Accuracy of the decisions of exited samples; NaN when nothing exits."""
    labels, predictions, exits = (np.asarray(a) for a in (labels, predictions, exits))
    exits = exits.astype(bool)
    return rate(int(np.sum((labels == predictions) & exits)), int(exits.sum()))


def avg_set_size(sets) -> float:
    """Mean size of prediction sets given as a (N, 2) boolean membership matrix (column c = class c included)."""
    sets = np.asarray(sets, dtype=bool)
    if sets.ndim != 2:
        raise ValueError("sets must be an (N, K) membership matrix")
    return float(sets.sum(axis=1).mean()) if sets.shape[0] else float("nan")
