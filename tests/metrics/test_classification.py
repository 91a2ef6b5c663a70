from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from roadwork_cli.metrics import classification as cm


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = (rng.random(500) < 0.3).astype(int)
    probs = np.clip(0.3 * labels + 0.7 * rng.random(500), 0, 1)
    return labels, probs


def test_metrics_agree_with_sklearn(data) -> None:
    labels, probs = data
    predictions = (probs >= 0.5).astype(int)
    assert cm.accuracy(labels, predictions) == pytest.approx(skm.accuracy_score(labels, predictions))
    assert cm.mcc(labels, predictions) == pytest.approx(skm.matthews_corrcoef(labels, predictions))
    assert cm.auroc(labels, probs) == pytest.approx(skm.roc_auc_score(labels, probs))
    assert cm.brier(labels, probs) == pytest.approx(skm.brier_score_loss(labels, probs))
    assert cm.nll(labels, np.clip(probs, 0.01, 0.99)) == pytest.approx(skm.log_loss(labels, np.clip(probs, 0.01, 0.99)))


def test_auroc_is_nan_with_one_class() -> None:
    assert np.isnan(cm.auroc(np.ones(4), np.linspace(0, 1, 4)))


def test_ece_matches_the_equal_width_formula(data) -> None:
    labels, probs = data
    n_bins = 10
    index = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    expected = sum(
        np.sum(index == b) / probs.size * abs(probs[index == b].mean() - labels[index == b].mean())
        for b in range(n_bins)
        if np.any(index == b)
    )
    assert cm.ece(labels, probs, n_bins) == pytest.approx(expected)


def test_ece_is_zero_for_perfectly_calibrated_bins() -> None:
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    probs = np.array([0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75])
    assert cm.ece(labels, probs, 4) == pytest.approx(0.0)
    bins = cm.reliability_bins(labels, probs, 4)
    assert bins.counts.tolist() == [0, 4, 0, 4]


def test_mcc_of_one_label_is_zero_without_a_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warns "A single label was found"; the trainer calls this per epoch
        assert cm.mcc([1, 1, 1], [1, 1, 1]) == 0.0
        assert cm.mcc([0, 0], [0, 0]) == 0.0
    assert cm.mcc([1, 1, 0], [1, 1, 1]) == pytest.approx(skm.matthews_corrcoef([1, 1, 0], [1, 1, 1]))
