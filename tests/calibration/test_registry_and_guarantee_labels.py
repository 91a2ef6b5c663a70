"""One rule registry, old params files, the infeasible default, the DKW precondition, and what is (not) certified."""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
from score_helpers import binomial_excess_pvalue, scrc_gate, write_scores

from roadwork_cli.calibration import list_scalers
from roadwork_cli.calibration.api import calibrate_run, calibrate_scores
from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.calibration.rules import GateRule, create_rule, list_rules, rule_class
from roadwork_cli.calibration.stats import positives_needed
from roadwork_cli.calibration.targets import Targets, create_method, list_methods
from roadwork_cli.config import CalibrationSettings
from roadwork_cli.errors import InfeasibleError, UnknownNameError, UsageError
from roadwork_cli.io.run import RunDir

NO_SCALING = {"cls": {"method": "none", "params": {}}, "gate": {"method": "none", "params": {}}, "gate_score": "gate"}


def _literal_args(field: str) -> list[str]:
    return list(typing.get_args(CalibrationSettings.model_fields[field].annotation))


def test_config_choices_are_the_registries() -> None:
    assert sorted(_literal_args("rule")) == list_rules()
    assert sorted(_literal_args("method")) == list_methods()
    assert sorted(_literal_args("scaling")) == sorted(list_scalers())


def test_registry_round_trips_every_rule_and_refuses_unknown_names() -> None:
    examples = {"gate": {"lambda": 0.4, "tau": 0.3}, "band": {"tau": 0.2, "b": 0.7},
                "sets": {"sets": {"roadwork": 0.6, "no_roadwork": 0.55}}}  # fmt: skip
    p, g = np.linspace(0, 1, 21), np.linspace(1, 0, 21)
    for name in list_rules():
        rule = rule_class(name).from_params(examples[name])
        params = rule.to_params()
        assert params["rule"] == name and set(params) == {"rule", "lambda", "tau", "b", "sets"}
        again = rule_class(name).from_params(params)
        assert again == rule
        np.testing.assert_array_equal(again.decide(p, g), rule.decide(p, g))
    assert create_rule("gate", lam=0.4, tau=0.3) == GateRule(lam=0.4, tau=0.3)  # create_* builds the object
    with pytest.raises(UnknownNameError, match="Unknown decision rule 'wedge'"):
        create_rule("wedge")
    with pytest.raises(UnknownNameError, match="Unknown calibration method 'bogus'"):
        create_method("bogus")
    with pytest.raises(UsageError, match="method=scrc"):
        SelectiveConformal(CalibrationSettings(fnr=0.05, delta=0.1, coverage=0.8, method="crc", rule="band"))


@pytest.mark.parametrize(
    ("params", "rule", "expected"),
    [
        # Version-1 files: a gate rule ...
        ({"version": 1, "method": "scrc", "feasible": True,
          "thresholds": {"rule": "gate", "lambda": 0.5, "tau": 0.3, "sets": None}}, "gate",
         ["defer", "roadwork", "roadwork"]),
        # ... one without thresholds.rule (a gate rule) ...
        ({"version": 1, "method": "scrc", "feasible": True, "thresholds": {"lambda": 0.5, "tau": 0.3, "sets": None}},
         "gate", ["defer", "roadwork", "roadwork"]),
        # ... a band rule (lambda null, b set) ...
        ({"version": 1, "method": "scrc", "feasible": True,
          "thresholds": {"rule": "band", "lambda": None, "tau": 0.25, "sets": None, "b": 0.7}}, "band",
         ["no_roadwork", "defer", "roadwork"]),
        # ... and prediction sets.
        ({"version": 1, "method": "sets", "feasible": True,
          "thresholds": {"rule": "sets", "lambda": None, "tau": None, "b": None,
                         "sets": {"roadwork": 0.6, "no_roadwork": 0.75}}}, "sets",
         ["no_roadwork", "defer", "roadwork"]),
    ],
)  # fmt: skip
def test_params_files_keep_loading(params: dict, rule: str, expected: list[str]) -> None:
    stage = SelectiveConformal.from_dicts(NO_SCALING, params)
    assert stage.rule == rule
    assert stage.predict(np.array([0.2, 0.4, 0.9]), np.array([0.1, 0.6, 0.6])).tolist() == expected
    assert stage.certified == (params["method"] == "scrc")  # derived for files without certified.targets


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run").ensure()
    write_scores(run.scores / "val_select.csv", 1500, 1)
    write_scores(run.scores / "val_calib.csv", 2500, 2)
    return run


HARD = CalibrationSettings(fnr=0.0005, coverage=0.95, delta=0.1, gate_score="gate", allow_infeasible=True)


def test_infeasible_calibration_defers_everything_unless_asked(run: RunDir) -> None:
    result = calibrate_run(run, HARD)
    params = result.params
    assert params["feasible"] is False and params["infeasible_decisions"] == "defer"
    assert params["certified"]["targets"] is False and params["certified"]["fnr_at_most"] is None
    calib = write_scores(run.root / "other.csv", 500, 9)
    from roadwork_cli.calibration.api import read_scores_csv

    table = read_scores_csv(calib)
    stage = SelectiveConformal.load(run.scaling, run.scrc_params)
    assert not stage.certified and set(stage.predict(table.p, table.gate)) == {"defer"}
    fallback = calibrate_run(run, HARD.model_copy(update={"infeasible_decisions": "fallback"}))
    stage = SelectiveConformal.from_dicts(fallback.scaling, fallback.params)
    p, g = stage.calibrate(table.p, table.gate)
    np.testing.assert_array_equal(stage.predict(table.p, table.gate), stage.decision_rule.decide(p, g))
    assert set(stage.predict(table.p, table.gate)) != {"defer"}


def test_infeasible_message_says_how_many_positives_are_needed(run: RunDir) -> None:
    with pytest.raises(InfeasibleError) as info:
        calibrate_run(run, HARD.model_copy(update={"allow_infeasible": False}))
    needed = positives_needed(0.0005, 0.1, 0.5, HARD.grid_size)
    assert f"needs at least {needed} exited roadwork images" in str(info.value)
    assert "defers every image" in str(info.value)


def test_feasible_scrc_is_certified_but_crc_is_not(tmp_path) -> None:
    scores = write_scores(tmp_path / "s.csv", 3000, 4)
    easy = CalibrationSettings(fnr=0.1, coverage=0.6, delta=0.1, gate_score="gate")
    scrc = calibrate_scores(scores, tmp_path / "a.json", easy)
    assert scrc.params["certified"]["targets"] is True and scrc.params["certified"]["fnr_at_most"] == 0.1
    crc = calibrate_scores(scores, tmp_path / "b.json", easy.model_copy(update={"method": "crc"}))
    assert crc.feasible and crc.params["certified"]["targets"] is False  # in expectation only
    assert json.loads((tmp_path / "b.json").read_text())["certified"]["targets"] is False


def test_delta1_above_one_half_is_refused() -> None:
    with pytest.raises(UsageError, match="exceeds 1/2"):
        Targets(alpha=0.05, delta=0.9, xi=0.8, delta_coverage_share=0.6)
    Targets(alpha=0.05, delta=0.9, xi=0.8, delta_coverage_share=0.5)  # delta1 = 0.45 is fine
    with pytest.raises(UsageError, match="exceeds 1/2"):
        calibrate_scores(write_scores_tmp(), "/dev/null", CalibrationSettings(delta=0.9, delta_coverage_share=0.6))


def write_scores_tmp():
    import tempfile
    from pathlib import Path

    return write_scores(Path(tempfile.mkdtemp()) / "s.csv", 300, 1)


@pytest.mark.parametrize(
    ("alpha", "delta", "share", "grid"), [(0.02, 0.1, 0.5, 10), (0.1, 0.2, 0.3, 1), (0.05, 0.1, 0.5, 4)]
)
def test_positives_needed_is_the_smallest_certifiable_count(alpha, delta, share, grid) -> None:
    m = positives_needed(alpha, delta, share, grid)
    level = (1 - share) * delta / grid
    assert (1 - alpha) ** m <= level < (1 - alpha) ** (m - 1)
    # Through the real procedure: m perfectly ranked positives (no misses possible at tau = 0) certify, m - 1 do not.
    for count, certifiable in ((m, True), (m - 1, False)):
        p = np.full(count, 0.9)
        grid_values = np.concatenate([[-np.inf], np.linspace(0.5, 0.9, grid - 1)])  # |G| values, all exit (g = 1)
        outcome = scrc_gate(p, np.ones(count), np.ones(count, dtype=int), grid_values, alpha, delta, 0.0, share)
        assert outcome.certified_pairs > 0 if certifiable else outcome.certified_pairs == 0
    assert positives_needed(0.02, 0.1, 0.5, 10) == 263  # the README's figure


@pytest.mark.slow
def test_certified_statement_holds_and_the_pointwise_bound_is_not_simultaneous() -> None:
    """Positives' p ~ U(0, 1), so with everything exiting the true FNR at tau is tau itself.

    Over many calibration draws FNR <= alpha fails at most delta2 of the time (binomial slack): that is what is
    certified. The Clopper-Pearson bound at the chosen tau fails MORE often than its nominal delta2, because tau was
    chosen after looking at the data; that is why it is reported as ``fnr_upper_pointwise`` and not as certified.
    """
    rng = np.random.default_rng(0)
    alpha, delta, share, trials, n = 0.05, 0.4, 0.5, 1500, 500
    delta2 = delta * (1 - share)
    beyond_alpha = beyond_pointwise = 0
    for _ in range(trials):
        y = (rng.random(n) < 0.5).astype(int)
        u = rng.random(n)
        p = np.where(y == 1, u, u**3)
        outcome = scrc_gate(p, np.zeros(n), y, np.array([-np.inf]), alpha, delta, 0.0, share)
        true_fnr = outcome.rule.tau
        beyond_alpha += int(true_fnr > alpha)
        beyond_pointwise += int(true_fnr > outcome.fnr_upper_pointwise)
    print(f"\nFNR > alpha: {beyond_alpha / trials:.3f}; FNR > pointwise CP bound: {beyond_pointwise / trials:.3f} "
          f"(nominal delta2 {delta2})")  # fmt: skip
    assert binomial_excess_pvalue(beyond_alpha, trials, delta2) > 0.01
    assert binomial_excess_pvalue(beyond_pointwise, trials, delta2) < 0.01
