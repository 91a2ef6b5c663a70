from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from score_helpers import write_scores

import roadwork_cli
from roadwork_cli.calibration.api import calibrate_run, calibrate_scores, read_scores_csv, split_rows
from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.config import CalibrationSettings
from roadwork_cli.errors import InfeasibleError, UsageError
from roadwork_cli.io.run import RunDir
from roadwork_cli.metrics.classification import nll

SETTINGS = CalibrationSettings(fnr=0.05, coverage=0.7, delta=0.1, gate_score="gate", scaling="temperature")


def test_calibrate_run_writes_scaling_and_params(run: RunDir) -> None:
    result = calibrate_run(run, SETTINGS)
    assert result.feasible
    scaling = json.loads(run.scaling.read_text())
    params = json.loads(run.scrc_params.read_text())
    assert scaling["cls"]["method"] == "temperature"
    test = read_scores_csv(run.scores / "test.csv")
    calibrated = SelectiveConformal.load(run.scaling, run.scrc_params).calibrate(test.p, test.gate)[0]
    assert nll(test.label, calibrated) < 0.8 * nll(test.label, test.p)  # the fitted scaling helps on held-out data
    assert scaling["gate"]["method"] == "platt" and scaling["gate_score"] == "gate"
    assert params["library_version"] == roadwork_cli.__version__
    assert params["targets"]["alpha"] == 0.05 and params["targets"]["xi"] == 0.7 and params["targets"]["delta"] == 0.1
    assert params["n"] == 2500 and 0 < params["n_pos"] < 2500
    assert params["feasible"] is True
    assert params["certified"]["fnr_upper_pointwise"] <= 0.05 and params["certified"]["coverage_lower"] >= 0.7
    assert params["scaling"] == scaling  # embedded copy: the params file alone is enough
    assert len(params["grid"]) == SETTINGS.grid_size
    assert set(params["attainable"]) == {"best_fnr_upper_at_coverage", "max_coverage_lower_at_fnr"}


def test_rule_from_files_matches_the_calibration(run: RunDir) -> None:
    calibrate_run(run, SETTINGS)
    rule = SelectiveConformal.load(run.scaling, run.scrc_params)
    embedded = SelectiveConformal.load(None, run.scrc_params)
    table = read_scores_csv(run.scores / "val_calib.csv")
    decisions = rule.predict(table.p, table.gate)
    np.testing.assert_array_equal(decisions, embedded.predict(table.p, table.gate))
    params = json.loads(run.scrc_params.read_text())
    assert np.mean(decisions != "defer") == pytest.approx(params["empirical"]["coverage"])
    p, g = rule.calibrate(table.p, table.gate)
    exits = g >= rule.lam
    assert ((decisions == "roadwork") == (exits & (p >= rule.tau))).all()


def test_softmax_response_gate_score(run: RunDir) -> None:
    result = calibrate_run(run, SETTINGS.model_copy(update={"gate_score": "softmax_response"}))
    rule = SelectiveConformal.from_dicts(result.scaling, result.params)
    p, g = rule.calibrate(np.array([0.1, 0.7]), np.array([0.9, 0.9]))
    np.testing.assert_allclose(g, np.maximum(p, 1 - p))


@pytest.mark.parametrize("method", ["crc", "sets"])
def test_other_methods_write_usable_params(run: RunDir, method: str) -> None:
    settings = SETTINGS.model_copy(update={"method": method, "allow_infeasible": True})
    result = calibrate_run(run, settings)
    assert result.params["method"] == method
    rule = SelectiveConformal.load(run.scaling, run.scrc_params)
    table = read_scores_csv(run.scores / "test.csv")
    assert set(np.unique(rule.predict(table.p, table.gate))) <= {"roadwork", "no_roadwork", "defer"}


def test_infeasible_raises_after_writing(run: RunDir) -> None:
    settings = SETTINGS.model_copy(update={"fnr": 0.0005, "coverage": 0.95})
    with pytest.raises(InfeasibleError) as info:
        calibrate_run(run, settings)
    assert info.value.exit_code == 3
    assert "best certifiable FNR bound" in str(info.value)
    params = json.loads(run.scrc_params.read_text())
    assert params["feasible"] is False
    assert params["attainable"]["best_fnr_upper_at_coverage"] > 0.0005
    ok = calibrate_run(run, settings.model_copy(update={"allow_infeasible": True}))
    assert not ok.feasible


def test_missing_scores_name_the_command(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="roadwork train"):
        calibrate_run(RunDir(tmp_path), SETTINGS)


def test_calibrate_scores_without_and_with_a_held_out_select_part(tmp_path: Path) -> None:
    scores = write_scores(tmp_path / "s.csv", 3000, 4)
    result = calibrate_scores(scores, tmp_path / "params.json", SETTINGS)
    assert result.params["scaling"]["cls"]["method"] == "none"
    assert result.params["n"] == 3000
    assert result.params["grid"][1:] == pytest.approx(list(np.linspace(0, 1, 10, endpoint=False)[1:]))
    held = calibrate_scores(scores, tmp_path / "p2.json", SETTINGS.model_copy(update={"scores_select_fraction": 0.3}))
    assert held.params["n"] == 2100 and held.params["data"]["n_select"] == 900
    assert held.params["scaling"]["cls"]["method"] == "temperature"
    select, calib = split_rows(10, 0.3)
    assert sorted(np.concatenate([select, calib]).tolist()) == list(range(10)) and select.size == 3


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("x,1,1.5,0.5", "row 3: p_roadwork='1.5' is not a probability"),
        ("x,2,0.5,0.5", "row 3: label='2' is not 0 or 1"),
        ("x,1,abc,0.5", "row 3: p_roadwork='abc' is not a number"),
        ("x,1,0.5,nan", "row 3: gate='nan' is not a probability"),
        ("x,1,0.5", "row 3: wrong number of fields"),
    ],
)
def test_bad_rows_name_the_row(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"id,label,p_roadwork,gate\na,0,0.2,0.9\n{row}\n")
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        read_scores_csv(path)


def test_missing_columns_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("label,p\n1,0.4\n")
    with pytest.raises(UsageError, match="lacks column"):
        read_scores_csv(path)
    path.write_text("p_roadwork,gate,label\n")
    with pytest.raises(UsageError, match="no rows"):
        read_scores_csv(path)
    with pytest.raises(UsageError, match="does not exist"):
        read_scores_csv(tmp_path / "nope.csv")


def test_rule_rejects_bad_params() -> None:
    with pytest.raises(UsageError, match="thresholds"):
        SelectiveConformal.from_dicts(None, {"tau": 0.5})
    with pytest.raises(UsageError, match="Bad scaling"):
        SelectiveConformal.from_dicts({"cls": {"method": "isotonic"}}, {"thresholds": {"lambda": 0.1, "tau": 0.5}})


def _write_select_with_gate(path: Path, gate_from_correct, seed: int = 5, n: int = 3000) -> Path:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    p = 1 / (1 + np.exp(-((2 * y - 1) * 1.5 + rng.normal(0, 1.5, n))))
    # Right or wrong as the rule decides: roadwork iff p >= about where SCRC-I puts tau (the positives' FNR-quantile).
    threshold = np.quantile(p[y == 1], SETTINGS.fnr)
    correct = ((p >= threshold).astype(int) == y).astype(float)
    gate = np.clip(gate_from_correct(correct, rng), 1e-6, 1 - 1e-6)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "p_roadwork", "gate"])
        writer.writerows(zip(y, p, gate, strict=True))
    return path


@pytest.mark.parametrize(
    ("gate_from_correct", "expected"),
    [
        # An oracle gate (high exactly when the rule's decision is right) ranks better than max(p, 1-p), which is
        # symmetric around 0.5 and so ranks the errors of a low-threshold decision badly.
        (lambda correct, rng: 0.2 + 0.6 * correct + rng.uniform(-0.05, 0.05, correct.size), "gate"),
        # A saturated, uninformative gate (what an over-fit SelectiveNet head gives) loses to the softmax response.
        (lambda correct, rng: 0.9999 + rng.uniform(-1e-5, 1e-5, correct.size), "softmax_response"),
    ],
)
def test_auto_selection_score_picks_the_better_ranking_on_val_select(tmp_path, gate_from_correct, expected) -> None:
    run = RunDir(tmp_path / "run").ensure()
    run.scores.mkdir()
    _write_select_with_gate(run.scores / "val_select.csv", gate_from_correct)
    _write_select_with_gate(run.scores / "val_calib.csv", gate_from_correct, seed=6)
    result = calibrate_run(run, SETTINGS.model_copy(update={"gate_score": "auto", "allow_infeasible": True}))
    assert result.scaling["gate_score"] == expected
    aurcs = result.scaling["gate_score_aurc_select"]
    assert aurcs[expected] <= min(aurcs.values())
    assert SelectiveConformal.from_dicts(result.scaling, result.params).gate_score == expected
