"""The band rule: decisions, SCRC-I over (b, tau), and its params through calibrate_run / SelectiveConformal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from score_helpers import scrc_band, write_scores

from roadwork_cli.calibration.api import calibrate_run, calibrate_scores, read_scores_csv
from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.calibration.grids import band_grid_from_scores
from roadwork_cli.calibration.rules import BandRule, GateRule
from roadwork_cli.calibration.stats import binomial_pvalue, dkw_slack
from roadwork_cli.config import CalibrationSettings
from roadwork_cli.errors import InfeasibleError, UsageError
from roadwork_cli.io.run import RunDir
from roadwork_cli.reporting.evaluate import compute_report

BAND = CalibrationSettings(fnr=0.05, coverage=0.7, delta=0.1, gate_score="gate", rule="band")


def test_decisions_follow_the_band_and_ignore_g() -> None:
    p = np.array([0.0, 0.099, 0.1, 0.5, 0.799, 0.8, 1.0])
    expected = ["no_roadwork", "no_roadwork", "defer", "defer", "defer", "roadwork", "roadwork"]
    band = BandRule(tau=0.1, b=0.8)
    for g in (np.zeros(7), np.ones(7), np.linspace(0, 1, 7)):
        assert band.decide(p, g).tolist() == expected
    # tau = b: the band is empty, everything exits.
    assert "defer" not in BandRule(tau=0.5, b=0.5).decide(p, np.zeros(7)).tolist()
    # The gate rule: g < lambda defers whatever p is.
    gate = GateRule(lam=0.5, tau=0.1).decide(p, np.array([0, 1, 1, 1, 1, 1, 0.0]))
    assert gate.tolist() == ["defer", "no_roadwork", "roadwork", "roadwork", "roadwork", "roadwork", "defer"]


def test_stage_rule_band_and_old_params_without_rule() -> None:
    scaling = {"cls": {"method": "none", "params": {}}, "gate": {"method": "none", "params": {}}, "gate_score": "gate"}
    band = SelectiveConformal.from_dicts(
        scaling, {"thresholds": {"rule": "band", "lambda": None, "tau": 0.2, "b": 0.7}}
    )
    assert band.rule == "band" and band.b == 0.7 and band.lam is None
    p = np.array([0.1, 0.5, 0.9])
    assert band.predict(p, np.zeros(3)).tolist() == ["no_roadwork", "defer", "roadwork"]
    old = SelectiveConformal.from_dicts(
        scaling, {"thresholds": {"lambda": 0.5, "tau": 0.2}}
    )  # written before band existed
    assert old.rule == "gate" and old.b is None
    assert old.predict(p, np.array([0.9, 0.9, 0.1])).tolist() == ["no_roadwork", "roadwork", "defer"]
    with pytest.raises(UsageError, match="rule"):
        SelectiveConformal.from_dicts(scaling, {"thresholds": {"rule": "wedge", "tau": 0.2}})
    with pytest.raises(UsageError, match="'b'"):
        SelectiveConformal.from_dicts(scaling, {"thresholds": {"rule": "band", "tau": 0.2}})


def _toy(seed: int = 0, n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    return 1 / (1 + np.exp(-((2 * y - 1) * 2.0 + rng.normal(0, 1.5, n)))), y


def test_scrc_band_certifies_what_it_reports() -> None:
    p, y = _toy()
    grid = np.array([0.3, 0.5, 0.7, 0.9])
    outcome = scrc_band(p, y, grid, alpha=0.05, delta=0.1, xi=0.7)
    assert outcome.feasible and outcome.rule.name == "band" and outcome.thresholds["lambda"] is None
    assert outcome.rule.b in grid and outcome.rule.tau <= outcome.rule.b
    decisions = outcome.rule.decide(p, np.zeros_like(p))
    exits = decisions != "defer"
    pos = exits & (y == 1)
    k, m = int(np.sum(pos & (decisions == "no_roadwork"))), int(pos.sum())
    assert (k, m) == (outcome.misses, outcome.exited_positives)
    assert exits.mean() == pytest.approx(outcome.coverage)
    # The chosen pair passes both tests at the Bonferroni-corrected levels (|B| = 4).
    assert binomial_pvalue(k, m, 0.05) <= 0.05 / 4
    assert outcome.coverage >= 0.7 + dkw_slack(p.size, 0.05 / 4)
    assert outcome.fnr_upper_pointwise <= 0.05 and outcome.coverage_lower >= 0.7
    accuracy = np.mean((decisions[exits] == "roadwork") == (y[exits] == 1))
    assert accuracy == pytest.approx(outcome.accuracy_on_exits)
    assert [r["b"] for r in outcome.per_grid] == grid.tolist()


def test_scrc_band_is_more_accurate_than_everything_exits_and_infeasible_falls_back() -> None:
    p, y = _toy(1)
    outcome = scrc_band(p, y, np.array([0.5, 0.7, 0.9]), alpha=0.05, delta=0.1, xi=0.7)
    everything = scrc_band(p, y, np.array([0.5, 0.7, 0.9]), alpha=0.05, delta=0.1, xi=1.0)
    assert outcome.accuracy_on_exits > everything.accuracy_on_exits
    assert not everything.feasible  # coverage 1 + slack is impossible
    assert "band" in everything.note and everything.attainable["max_coverage_lower_at_fnr"] is not None
    tiny = scrc_band(p[:20], y[:20], np.array([0.5]), alpha=0.01, delta=0.1, xi=0.5)
    assert not tiny.feasible and tiny.rule.tau == 0.0 and tiny.rule.b == 0.5  # nothing certified: defer all p < max b


def test_band_grid_sits_where_coverage_binds() -> None:
    p, y = _toy(2)
    grid = band_grid_from_scores(p, y, 10, xi=0.8, alpha=0.05)
    assert grid.size == 10 and np.all(np.diff(grid) > 0)
    assert np.mean(p < grid[0]) == pytest.approx(0.2, abs=0.002)  # lowest b: tau = 0 defers exactly 1 - xi
    plug_in = np.quantile(p[y == 1], 0.1)
    assert np.mean(p < grid[-1]) == pytest.approx(0.2 + np.mean(p < plug_in), abs=0.002)


def test_calibrate_run_band_writes_params_that_stage_rule_reproduces(run: RunDir) -> None:
    result = calibrate_run(run, BAND)
    assert result.feasible
    params = json.loads(run.scrc_params.read_text())
    thresholds = params["thresholds"]
    assert thresholds["rule"] == "band" and thresholds["lambda"] is None
    assert 0 <= thresholds["tau"] <= thresholds["b"] <= 1
    assert params["certified"]["fnr_upper_pointwise"] <= 0.05 and params["certified"]["coverage_lower"] >= 0.7
    assert thresholds["b"] in params["grid"] and len(params["grid"]) <= BAND.grid_size
    rule = SelectiveConformal.load(run.scaling, run.scrc_params)
    assert SelectiveConformal.load(None, run.scrc_params).rule == "band"
    calib = read_scores_csv(run.scores / "val_calib.csv")
    decisions = rule.predict(calib.p, calib.gate)
    p, _ = rule.calibrate(calib.p, calib.gate)
    np.testing.assert_array_equal(decisions == "no_roadwork", p < rule.tau)
    np.testing.assert_array_equal(decisions == "roadwork", p >= rule.b)
    assert np.mean(decisions != "defer") == pytest.approx(params["empirical"]["coverage"])
    exits, pos = decisions != "defer", (decisions != "defer") & (calib.label == 1)
    assert int(np.sum(pos & (decisions == "no_roadwork"))) == params["empirical"]["misses"]
    # evaluate goes through the rule: its coverage on val_calib is the calibration's, and g is reported as unused.
    report = compute_report(calib, rule)
    assert report["coverage"] == pytest.approx(exits.mean())
    assert report["calibration"]["rule"] == "band" and report["calibration"]["gate_score"] is None
    assert report["thresholds"]["b"] == thresholds["b"]


def test_band_old_params_and_other_methods(run: RunDir, tmp_path: Path) -> None:
    gate = calibrate_run(run, BAND.model_copy(update={"rule": "gate"}))
    assert gate.params["thresholds"]["rule"] == "gate" and gate.params["thresholds"]["b"] is None
    legacy = json.loads(run.scrc_params.read_text())
    del legacy["thresholds"]["rule"]  # a params file from before the band rule
    legacy_path = tmp_path / "legacy.json"
    legacy_path.write_text(json.dumps(legacy))
    rule = SelectiveConformal.load(None, legacy_path)
    table = read_scores_csv(run.scores / "test.csv")
    assert rule.rule == "gate"
    np.testing.assert_array_equal(rule.predict(table.p, table.gate), gate_rule(run).predict(table.p, table.gate))
    with pytest.raises(UsageError, match="method=scrc"):
        calibrate_run(run, BAND.model_copy(update={"method": "crc"}))


def gate_rule(run: RunDir) -> SelectiveConformal:
    return SelectiveConformal.load(run.scaling, run.scrc_params)


def test_band_infeasible_and_scores_mode(run: RunDir, tmp_path: Path) -> None:
    with pytest.raises(InfeasibleError, match="band"):
        calibrate_run(run, BAND.model_copy(update={"fnr": 0.0005, "coverage": 0.95}))
    assert json.loads(run.scrc_params.read_text())["feasible"] is False
    scores = write_scores(tmp_path / "s.csv", 3000, 4)
    result = calibrate_scores(scores, tmp_path / "params.json", BAND)  # no val_select: data-free b grid on [0.5, 1)
    assert result.params["grid"] == pytest.approx(list(np.linspace(0.5, 1.0, BAND.grid_size, endpoint=False)))
    assert result.params["thresholds"]["rule"] == "band"
