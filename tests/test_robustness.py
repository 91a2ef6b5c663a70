"""`roadwork evaluate --robustness`: the per-level block, the NATIX reward, seeded (repeatable) challenge views, the
per-level score cache, and the report's table, plot and note on the guarantee's scope."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.robustness import LEVELS, ROBUSTNESS_NOTE, natix_reward

runner = CliRunner()
TINY = {
    "ROADWORK_MODEL__BACKBONE": "tiny_vit",
    "ROADWORK_TRAIN__EPOCHS": "3",
    "ROADWORK_CALIBRATION__ALLOW_INFEASIBLE": "true",  # 80 synthetic images cannot certify the targets
    # The fallback thresholds exit some images, so coverage and FNR on exits are measured on every level.
    "ROADWORK_CALIBRATION__INFEASIBLE_DECISIONS": "fallback",
    "ROADWORK_EXPORT__ALLOW_UNCERTIFIED": "true",
    "HF_HUB_OFFLINE": "1",
}
CONTRACT_METRICS = {
    "n", "accuracy", "mcc", "auroc", "ece", "coverage", "accuracy_on_exits", "fnr_on_exits", "fpr_on_exits",
    "risk_at_coverage", "coverage_at_risk", "avg_set_size", "aurc", "guarantee",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A trained and calibrated tiny run (tiny_vit, synthetic:80) built by the demo pipeline."""
    from roadwork_cli.pipeline import demo_settings, run_demo

    run = tmp_path_factory.mktemp("robustness") / "run"
    run_demo(demo_settings(None, per_class=40, run=run, environ=TINY))
    return run


def _settings(run: Path):
    from roadwork_cli.pipeline import demo_settings

    return demo_settings(None, per_class=40, run=run, environ=TINY)


@pytest.mark.parametrize(
    ("mcc", "accuracy", "expected"),
    [(1.0, 1.0, 1.0), (0.0, 0.5, 0.25**3), (0.5, 0.8, 0.65**3), (None, 0.5, 0.25**3), (-1.0, 0.0, -0.125)],
)
def test_natix_reward_is_the_validators_formula(mcc, accuracy, expected):
    assert natix_reward(mcc, accuracy) == pytest.approx(expected)
    assert natix_reward(0.3, None) is None


@pytest.mark.slow
def test_evaluate_robustness_writes_the_per_level_block(tiny_run: Path):
    result = runner.invoke(app, ["evaluate", "--run", str(tiny_run), "--robustness"], env=TINY)
    assert result.exit_code == 0, result.output
    assert "NATIX challenge levels" in result.output and "calibration distribution" in result.output
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    block = report["robustness"]
    assert block["note"] == ROBUSTNESS_NOTE and "only promised for the calibration distribution" in block["note"]
    n_test = len(json.loads((tiny_run / "splits.json").read_text())["splits"]["test"])
    for level in LEVELS:
        metrics = block[f"level_{level}"]
        assert CONTRACT_METRICS | {"natix_reward", "satisfied"} <= set(metrics), level
        assert metrics["n"] + metrics["n_failed"] == n_test
        assert metrics["natix_reward"] == pytest.approx((0.5 * metrics["mcc"] + 0.5 * metrics["accuracy"]) ** 3)
        guarantee = metrics["guarantee"]
        held = (metrics["fnr_on_exits"] is None or metrics["fnr_on_exits"] <= guarantee["alpha"]) and (
            metrics["coverage"] >= guarantee["xi"]
        )
        assert metrics["satisfied"] is held is guarantee["satisfied"]
        assert (tiny_run / "eval" / "robustness" / f"level_{level}.csv").is_file()
    # The clean metrics of the report are untouched by the robustness pass.
    assert {"accuracy", "guarantee", "split"} <= set(report) and report["split"] == "test"
    assert report["files"]["robustness"] == "robustness.png" and (tiny_run / "eval" / "robustness.png").is_file()
    html = (tiny_run / "eval" / "report.html").read_text()
    assert "Robustness (NATIX challenge levels)" in html and "only promised for the calibration distribution" in html
    # The evaluation's own figures are still embedded, in their order, with the robustness plot after them.
    assert (
        html.index("<h2>Risk-coverage curves")
        < html.index("<h2>Reliability diagram")
        < html.index("<h2>Robustness: metrics per NATIX challenge level")
    )


@pytest.mark.slow
def test_reward_uses_the_calibrated_p_at_one_half(tiny_run: Path):
    """Recompute a level's accuracy, MCC and reward from its cached raw scores and the run's calibration."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    from roadwork_cli.calibration.api import read_scores_csv
    from roadwork_cli.calibration.estimator import SelectiveConformal
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.robustness import robustness_block

    run = RunDir(tiny_run)
    rule = SelectiveConformal.load(run.scaling, run.scrc_params)
    table = read_scores_csv(run.eval / "robustness" / "level_2.csv")
    p, _ = rule.calibrate(table.p, table.gate)
    decided = (p >= 0.5).astype(int)
    accuracy, mcc = accuracy_score(table.label, decided), matthews_corrcoef(table.label, decided)
    level = robustness_block({2: table}, rule)["level_2"]
    assert level["accuracy"] == pytest.approx(accuracy) and level["mcc"] == pytest.approx(mcc)
    assert level["natix_reward"] == pytest.approx((0.5 * mcc + 0.5 * accuracy) ** 3)


@pytest.mark.slow
def test_levels_are_seeded_cached_and_rescored_identically(tiny_run: Path):
    from roadwork_cli.calibration.api import read_scores_csv
    from roadwork_cli.robustness import score_levels

    settings = _settings(tiny_run)
    folder = tiny_run / "eval" / "robustness"
    score_levels(tiny_run, settings)
    first = {level: (folder / f"level_{level}.csv").read_bytes() for level in LEVELS}
    stamps = {level: (folder / f"level_{level}.csv").stat().st_mtime_ns for level in LEVELS}

    # A re-run re-uses every level's cached scores.
    score_levels(tiny_run, settings)
    assert {level: (folder / f"level_{level}.csv").stat().st_mtime_ns for level in LEVELS} == stamps

    # Scored again from scratch, every seeded challenge view gives the same scores.
    shutil.rmtree(folder)
    score_levels(tiny_run, settings)
    assert {level: (folder / f"level_{level}.csv").read_bytes() for level in LEVELS} == first

    # The levels are different views: the scores of level 3 are not those of level 0.
    clean, hardest = read_scores_csv(folder / "level_0.csv"), read_scores_csv(folder / "level_3.csv")
    assert clean.ids == hardest.ids and not np.allclose(clean.p, hardest.p)


@pytest.mark.slow
def test_a_cache_of_another_model_or_challenge_is_not_reused(tiny_run: Path):
    from roadwork_cli.robustness import score_levels

    settings = _settings(tiny_run)
    folder = tiny_run / "eval" / "robustness"
    score_levels(tiny_run, settings)
    level_1 = folder / "level_1.csv"
    original = level_1.read_text()
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"head": "0" * 64}))  # as if the head had been re-trained
    level_1.write_text(original.splitlines()[0] + "\nstale,stale,1,0.5,0.5\n")  # scores of that other head
    stamp = level_1.stat().st_mtime_ns
    score_levels(tiny_run, settings)
    assert level_1.stat().st_mtime_ns != stamp and level_1.read_text() == original
    assert json.loads((folder / "meta.json").read_text()) == meta


@pytest.mark.slow
def test_other_split_goes_to_its_own_folder(tiny_run: Path):
    from roadwork_cli.robustness import score_levels

    tables = score_levels(tiny_run, _settings(tiny_run), split="val_calib", levels=(1,))
    n_calib = len(json.loads((tiny_run / "splits.json").read_text())["splits"]["val_calib"])
    assert list(tables) == [1] and len(tables[1]) == n_calib
    assert (tiny_run / "eval" / "robustness" / "val_calib" / "level_1.csv").is_file()


def test_robustness_refuses_scores_and_source_modes(tmp_path: Path):
    scores = tmp_path / "s.csv"
    scores.write_text("p_roadwork,gate,label\n0.9,0.9,1\n")
    args = ["evaluate", "--scores", str(scores), "--params", str(tmp_path / "p.json"), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--robustness"])
    assert result.exit_code == 2 and "--robustness" in result.output
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path), "--source", "synthetic:4", "--robustness"])
    assert result.exit_code == 2 and "--robustness" in result.output


def test_unknown_level_is_a_usage_error(tmp_path: Path):
    from roadwork_cli.errors import UsageError
    from roadwork_cli.robustness import score_levels

    with pytest.raises(UsageError, match="levels are 0, 1, 2 and 3"):
        score_levels(tmp_path, _settings(tmp_path), levels=(4,))
