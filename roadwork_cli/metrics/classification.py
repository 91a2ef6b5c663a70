"""Single-stage classification metrics on every image: accuracy, MCC, AUROC, ECE, Brier, reliability bins.

sklearn is imported inside the functions that use it so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _labels_probs(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(int).reshape(-1)
    probs = np.asarray(probs, dtype=float).reshape(-1)
    if labels.shape != probs.shape:
        raise ValueError(f"labels and probabilities differ in length: {labels.size} vs {probs.size}")
    return labels, probs


def accuracy(labels, predictions) -> float:
    """Fraction of correct 0/1 predictions."""
    labels = np.asarray(labels).astype(int)
    predictions = np.asarray(predictions).astype(int)
    return float(np.mean(labels == predictions)) if labels.size else float("nan")


def mcc(labels, predictions) -> float:
    """Matthews correlation coefficient (0 when it is undefined, as sklearn does)."""
    from sklearn.metrics import matthews_corrcoef

    labels, predictions = np.asarray(labels).astype(int), np.asarray(predictions).astype(int)
    if np.unique(np.concatenate([labels, predictions])).size < 2:
        return 0.0  # one label in both (a one-class split): sklearn's value, without its warning on every epoch
    return float(matthews_corrcoef(labels, predictions))


def auroc(labels, probs) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels, probs = _labels_probs(labels, probs)
    if np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def brier(labels, probs) -> float:
    """Mean squared error of the roadwork probability."""
    labels, probs = _labels_probs(labels, probs)
    return float(np.mean((probs - labels) ** 2))


def nll(labels, probs, eps: float = 1e-12) -> float:
    """Mean binary negative log-likelihood (probabilities clipped to [eps, 1 - eps])."""
    labels, probs = _labels_probs(labels, probs)
    probs = np.clip(probs, eps, 1 - eps)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins of the predicted probability.

    Attributes:
        edges: Bin edges, shape (B + 1,).
        counts: Samples per bin, shape (B,).
        mean_prob: Mean predicted probability per bin (NaN for empty bins).
        frac_pos: Observed fraction of positives per bin (NaN for empty bins).
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_prob: np.ndarray
    frac_pos: np.ndarray


def reliability_bins(labels, probs, n_bins: int = 15) -> ReliabilityBins:
    """Bin probabilities into ``n_bins`` equal-width bins on [0, 1] (the last bin includes 1)."""
    labels, probs = _labels_probs(labels, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(probs, edges[1:-1], right=False), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(index, weights=probs, minlength=n_bins) / counts
        frac_pos = np.bincount(index, weights=labels, minlength=n_bins) / counts
    return ReliabilityBins(edges=edges, counts=counts, mean_prob=mean_prob, frac_pos=frac_pos)


def ece(labels, probs, n_bins: int = 15) -> float:
    """Expected calibration error of p(roadwork) with equal-width bins: sum_b |B|/N * |mean p - frac positive|."""
    bins = reliability_bins(labels, probs, n_bins)
    total = bins.counts.sum()
    if total == 0:
        return float("nan")
    filled = bins.counts > 0
    gaps = np.abs(bins.mean_prob[filled] - bins.frac_pos[filled])
    return float(np.sum(bins.counts[filled] / total * gaps))
