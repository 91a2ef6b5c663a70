from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, binom
from score_helpers import scrc_gate as scrc_i

from roadwork_cli.calibration.certify import crc_threshold
from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.calibration.grids import fixed_gate_grid, gate_grid_from_scores, tau_candidates
from roadwork_cli.calibration.rules import GateRule, SetsRule
from roadwork_cli.calibration.stats import binomial_pvalue, clopper_pearson_lower, clopper_pearson_upper, dkw_slack
from roadwork_cli.calibration.targets import Targets
from roadwork_cli.config import CalibrationSettings
from roadwork_cli.errors import UnknownNameError
from roadwork_cli.metrics import selective as sm


def synthetic(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    g = rng.random(n)
    z = (2 * y - 1) * (1 + 5 * g) + rng.normal(size=n)
    return 1 / (1 + np.exp(-z)), g, y


def test_pvalues_and_clopper_pearson_agree_with_scipy() -> None:
    k = np.array([0, 1, 3, 10, 50])
    m = np.array([10, 50, 100, 200, 60])
    np.testing.assert_allclose(binomial_pvalue(k, m, 0.05), binom.cdf(k, m, 0.05))
    np.testing.assert_allclose(clopper_pearson_upper(k, m, 0.01), beta.ppf(0.99, k + 1, m - k))
    np.testing.assert_allclose(clopper_pearson_lower(k[1:], m[1:], 0.01), beta.ppf(0.01, k[1:], m[1:] - k[1:] + 1))
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0
    assert clopper_pearson_lower(0, 5, 0.1) == 0.0
    assert binomial_pvalue(0, 0, 0.05) == 1.0  # no exited positives: nothing can be certified


def test_clopper_pearson_upper_is_where_the_pvalue_equals_the_level() -> None:
    k, m, level = 3, 400, 0.05
    bound = float(clopper_pearson_upper(k, m, level))
    assert binom.cdf(k, m, bound) == pytest.approx(level, rel=1e-6)


def test_dkw_slack_formula() -> None:
    assert dkw_slack(1000, 0.05) == pytest.approx(math.sqrt(math.log(20) / 2000))
    assert dkw_slack(0, 0.05) == math.inf


def test_crc_worked_example_matches_the_reference_formula() -> None:
    # Nine positives; alpha = 0.2. CRC: (m Rhat + 1) / (m + 1) <= alpha  <=>  misses <= 0.2 * 10 - 1 = 1.
    p_pos = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    tau = crc_threshold(p_pos, 0.2)
    assert tau == pytest.approx(0.15)  # midpoint between 0.1 and 0.2: exactly one miss
    for candidate in tau_candidates(p_pos):
        misses = np.sum(p_pos < candidate)
        assert ((misses + 1) / 10 <= 0.2) == (candidate <= tau)
    assert crc_threshold(p_pos, 0.05) == 0.0  # (0 + 1) / 10 > 0.05: only "all roadwork" is allowed


def test_scrc_i_certifies_with_the_documented_bounds() -> None:
    p, g, y = synthetic(3000)
    grid = gate_grid_from_scores(np.random.default_rng(9).random(1000), 10, 0.0, 0.2)
    alpha, delta, xi = 0.05, 0.1, 0.7
    outcome = scrc_i(p, g, y, grid, alpha, delta, xi)
    assert outcome.feasible
    level = outcome.delta2 / len(outcome.grid)
    exits = g >= outcome.rule.lam
    predictions = (p >= outcome.rule.tau).astype(int)
    k, m = sm.fnr_counts(y, predictions, exits)
    assert (k, m) == (outcome.misses, outcome.exited_positives)
    assert binom.cdf(k, m, alpha) <= level  # the chosen pair's hypothesis was rejected
    assert outcome.fnr_upper_pointwise == pytest.approx(beta.ppf(1 - level, k + 1, m - k))
    assert outcome.fnr_upper_pointwise <= alpha
    assert sm.coverage(exits) == pytest.approx(outcome.coverage)
    assert outcome.coverage >= xi + dkw_slack(3000, outcome.delta1)
    assert outcome.coverage_lower == pytest.approx(outcome.coverage - dkw_slack(3000, outcome.delta1))
    assert outcome.delta1 + outcome.delta2 == pytest.approx(delta)


def test_fixed_sequence_stops_at_the_first_non_rejection() -> None:
    p, g, y = synthetic(2000, seed=1)
    alpha, delta = 0.05, 0.1
    outcome = scrc_i(p, g, y, np.array([-np.inf]), alpha, delta, 0.0)
    taus = tau_candidates(p)
    pos = np.sort(p[y == 1])
    pvalues = binom.cdf(np.searchsorted(pos, taus, side="left"), pos.size, alpha)
    first_fail = int(np.argmax(pvalues > delta / 2))
    record = outcome.per_grid[0]
    assert record["certified_taus"] == first_fail
    assert outcome.rule.tau <= taus[first_fail - 1]


def test_objective_prefers_accuracy_then_coverage() -> None:
    p, g, y = synthetic(3000, seed=2)
    grid = np.array([-np.inf, 0.1, 0.2])
    accuracy = scrc_i(p, g, y, grid, 0.05, 0.1, 0.5, objective="accuracy")
    coverage = scrc_i(p, g, y, grid, 0.05, 0.1, 0.5, objective="coverage")
    assert coverage.coverage >= accuracy.coverage
    assert accuracy.accuracy_on_exits >= coverage.accuracy_on_exits
    assert scrc_i(p, g, y, grid, 0.05, 0.1, 0.5, objective="mcc").feasible


def test_infeasible_reports_what_is_attainable() -> None:
    p, g, y = synthetic(500, seed=3)
    grid = fixed_gate_grid(10)
    outcome = scrc_i(p, g, y, grid, 0.001, 0.1, 0.9)
    assert not outcome.feasible
    attainable = outcome.attainable
    assert attainable["best_fnr_upper_at_coverage"] is not None and attainable["best_fnr_upper_at_coverage"] > 0.001
    assert "No threshold pair certifies" in outcome.note
    # Achievable targets taken from the report are then feasible.
    relaxed = scrc_i(p, g, y, grid, 0.1, 0.1, 0.5)
    assert relaxed.feasible
    data = outcome.to_dict()
    assert data["grid"][0] is None  # -inf is written as null (everything exits)


def test_coverage_bound_excludes_lambda_near_the_target() -> None:
    p, g, y = synthetic(400, seed=4)
    # The only lambda has an exit rate of about 0.8; with n = 400 the DKW slack (~0.06) rules it out for xi = 0.78.
    outcome = scrc_i(p, g, y, np.array([0.2]), 0.2, 0.1, 0.78)
    assert not outcome.feasible
    assert outcome.per_grid[0]["coverage_ok"] is False


def test_grid_from_val_select_and_fixed_grid() -> None:
    grid = gate_grid_from_scores(np.linspace(0, 1, 101), 5, 0.0, 0.2)
    assert grid[0] == -np.inf
    np.testing.assert_allclose(grid[1:], [0.05, 0.1, 0.15, 0.2])
    fixed = fixed_gate_grid(4, 0.5, 1.0)
    assert fixed[0] == -np.inf
    np.testing.assert_allclose(fixed[1:], [0.625, 0.75, 0.875])


def test_decide_rule_semantics() -> None:
    p = np.array([0.2, 0.3, 0.9, 0.9])
    g = np.array([0.6, 0.5, 0.7, 0.4])
    assert GateRule(lam=0.5, tau=0.3).decide(p, g).tolist() == ["no_roadwork", "roadwork", "roadwork", "defer"]
    everything = GateRule(lam=None, tau=0.5).decide(p, g).tolist()
    assert everything == ["no_roadwork", "no_roadwork", "roadwork", "roadwork"]


def test_prediction_sets_mode() -> None:
    p, g, y = synthetic(2000, seed=5)
    outcome = SetsRule.certify("sets", p, g, y, [], Targets(0.05, 0.1, 0.5))
    t = outcome.thresholds["sets"]
    decisions = outcome.rule.decide(p, g)
    exits = decisions != "defer"
    assert outcome.coverage == pytest.approx(exits.mean())
    sets = outcome.rule.sets(p)
    assert outcome.attainable["avg_set_size"] == pytest.approx(sets.sum(axis=1).mean())
    assert ((sets.sum(axis=1) == 1) == exits).all()  # singletons exit; empty or full sets defer
    # Positives whose set leaves out roadwork are at most alpha (conformal, in expectation; here on the calib data).
    assert np.mean(p[y == 1] < t["roadwork"]) <= 0.05


def test_selective_conformal_fit_conformalize_predict_save_load(tmp_path) -> None:
    p, g, y = synthetic(3000, seed=6)
    p_select, g_select, y_select = synthetic(500, seed=7)
    settings = CalibrationSettings(fnr=0.05, delta=0.1, coverage=0.7, gate_score="gate")
    sc = SelectiveConformal(settings)
    with pytest.raises(RuntimeError):
        sc.predict(p, g)  # nothing conformalized yet
    sc.fit(p_select, g_select, y_select, n_calib=p.size)
    assert sc.grid_.size == 10 and sc.scaling["cls"]["method"] == "platt"
    outcome = sc.conformalize(p, g, y)
    decisions = sc.predict(p, g)  # raw scores in: the production path scales them first
    assert np.mean(decisions != "defer") == pytest.approx(outcome.coverage)
    p_cal, g_cal = sc.calibrate(p, g)
    np.testing.assert_array_equal(decisions, outcome.rule.decide(p_cal, g_cal))
    sc.save(tmp_path / "params.json", tmp_path / "scaling.json")
    for scaling in (tmp_path / "scaling.json", None):  # scrc_params.json alone suffices (scaling embedded)
        np.testing.assert_array_equal(
            SelectiveConformal.load(scaling, tmp_path / "params.json").predict(p, g), decisions
        )
    with pytest.raises(UnknownNameError, match="Unknown calibration method 'bogus'"):
        SelectiveConformal(CalibrationSettings.model_construct(**{**settings.model_dump(), "method": "bogus"}))
