from __future__ import annotations

import itertools

import numpy as np
import pytest

from roadwork_cli.metrics import selective as sm


def brute_force_aurc(scores: np.ndarray, losses: np.ndarray) -> float:
    """Mean over every tie-breaking order of Geifman's AURC (sort by score, average top-k risks)."""
    values = []
    for order in itertools.permutations(range(scores.size)):
        order = np.array(order)
        ranked = order[np.argsort(-scores[order], kind="stable")]  # ties kept in this permutation's order
        cumulative = np.cumsum(losses[ranked])
        values.append(np.mean(cumulative / np.arange(1, scores.size + 1)))
    return float(np.mean(values))


def test_aurc_without_ties_matches_the_definition() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    losses = np.array([0.0, 1.0, 0.0, 1.0])
    # top-1: 0, top-2: 1/2, top-3: 1/3, top-4: 1/2
    assert sm.aurc(scores, losses) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_aurc_with_ties_is_the_expectation_over_tie_breaking_and_order_free() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.2])
    losses = np.array([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    expected = brute_force_aurc(scores, losses)
    assert sm.aurc(scores, losses) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    for _ in range(5):
        perm = rng.permutation(scores.size)
        assert sm.aurc(scores[perm], losses[perm]) == pytest.approx(expected)


def test_risk_coverage_curve_groups_tied_scores() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    losses = np.array([0.0, 1.0, 0.0, 1.0])
    curve = sm.risk_coverage_curve(scores, losses)
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.5, 0.1])
    np.testing.assert_allclose(curve.coverage, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(curve.risk, [0.0, 1 / 3, 0.5])
    reversed_curve = sm.risk_coverage_curve(scores[::-1], losses[::-1])
    np.testing.assert_allclose(reversed_curve.risk, curve.risk)


def test_e_aurc_is_zero_for_a_perfect_ranking_and_positive_otherwise() -> None:
    losses = np.array([0, 0, 1, 1, 0, 1], dtype=float)
    perfect = -losses + np.arange(6) * 1e-3
    assert sm.e_aurc(perfect, losses) == pytest.approx(0.0, abs=1e-12)
    assert sm.e_aurc(losses, losses) > 0.1  # worst ranking: errors first


def test_risk_at_coverage_and_coverage_at_risk() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    losses = np.array([0.0, 0.0, 1.0, 0.0, 1.0])
    assert sm.risk_at_coverage(scores, losses, 0.4) == pytest.approx(0.0)
    assert sm.risk_at_coverage(scores, losses, 0.6) == pytest.approx(1 / 3)
    assert sm.risk_at_coverage(scores, losses, 1.0) == pytest.approx(0.4)
    assert sm.coverage_at_risk(scores, losses, 0.0) == pytest.approx(0.4)
    assert sm.coverage_at_risk(scores, losses, 0.3) == pytest.approx(0.8)  # 1/4 at 4 samples
    assert sm.coverage_at_risk(np.ones(2), np.ones(2), 0.5) == 0.0


def test_rates_on_exits() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    predictions = np.array([1, 0, 1, 0, 1, 0, 0])
    exits = np.array([1, 1, 1, 1, 1, 1, 0], dtype=bool)
    assert sm.fnr_on_exits(labels, predictions, exits) == pytest.approx(1 / 3)
    assert sm.fpr_on_exits(labels, predictions, exits) == pytest.approx(1 / 3)
    assert sm.accuracy_on_exits(labels, predictions, exits) == pytest.approx(4 / 6)
    assert sm.coverage(exits) == pytest.approx(6 / 7)
    assert np.isnan(sm.fnr_on_exits(labels, predictions, np.zeros(7, dtype=bool)))


def test_avg_set_size() -> None:
    sets = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=bool)
    assert sm.avg_set_size(sets) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sm.avg_set_size(np.ones(3))


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ"):
        sm.aurc([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        sm.aurc([np.nan], [1.0])
