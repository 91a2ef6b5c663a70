"""`roadwork calibrate` and `roadwork evaluate`: both modes, exit codes, rendering, and no heavy imports."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from roadwork_cli.cli.app import app

runner = CliRunner()


def flat(output: str) -> str:
    """Terminal output with rich's line wrapping undone (whitespace runs become one space)."""
    return " ".join(output.split())


def write_scores(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    g = rng.random(n)
    p = 1 / (1 + np.exp(-((2 * y - 1) * (1 + 5 * g) + rng.normal(size=n))))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "p_roadwork", "gate", "label", "note"])
        for i in range(n):
            writer.writerow([f"{seed}-{i}", f"{p[i]:.8f}", f"{g[i]:.8f}", y[i], "extra columns are ignored"])
    return path


@pytest.fixture
def scores(tmp_path: Path) -> dict[str, Path]:
    return {"calib": write_scores(tmp_path / "calib.csv", 2000, 1), "test": write_scores(tmp_path / "test.csv", 800, 2)}


def test_calibrate_flags_left_out_keep_the_settings_file(scores: dict[str, Path], tmp_path: Path) -> None:
    """A flag not given overrides nothing: the YAML's targets stay; a flag given wins over the YAML."""
    config = tmp_path / "settings.yaml"
    config.write_text("calibration:\n  fnr: 0.08\n  coverage: 0.6\n  delta: 0.2\n")
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params), "--config", str(config)]
    result = runner.invoke(app, [*args, "--fnr", "0.05"])
    assert result.exit_code == 0, result.output
    targets = json.loads(params.read_text())["targets"]
    assert (targets["alpha"], targets["xi"], targets["delta"]) == (0.05, 0.6, 0.2)


def test_calibrate_then_evaluate_scores(scores: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params), "--fnr", "0.05", "--coverage", "0.7"]
    result = runner.invoke(app, [*args, "--delta", "0.2"])
    assert result.exit_code == 0, result.output
    assert "lambda" in result.output and "certified:" in result.output
    written = json.loads(params.read_text())
    assert written["targets"]["alpha"] == 0.05 and written["targets"]["delta"] == 0.2 and written["feasible"]
    report_path = tmp_path / "eval" / "report.json"
    result = runner.invoke(
        app, ["evaluate", "--scores", str(scores["test"]), "--params", str(params), "--out", str(report_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["n"] == 800 and report["guarantee"]["alpha"] == 0.05
    assert report["guarantee"]["certified"] is True
    assert report["guarantee"]["verdict"].split(";")[0].split(",")[0] in result.output  # "certified"
    assert "observed rates within" in result.output


def test_infeasible_targets_exit_3_and_show_what_is_attainable(scores: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params)]
    args += ["--fnr", "0.0005", "--coverage", "0.95"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "best certifiable FNR bound" in result.output
    assert "best fnr upper at coverage" in result.output  # the table of attainable values
    assert json.loads(params.read_text())["feasible"] is False
    result = runner.invoke(app, [*args, "--allow-infeasible"])
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "no guarantee (targets not certified)" in flat(result.output)
    assert "exited roadwork images" in flat(result.output)  # how many positives the targets need


def test_infeasible_calibrate_json_prints_the_reason(scores: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params), "--fnr", "0.0005", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    printed = json.loads(result.stdout)  # one JSON object on stdout, even on failure
    assert printed["feasible"] is False and printed["exit_code"] == 3
    assert "No threshold pair certifies FNR <= 0.0005" in printed["error"]
    assert (
        printed["params_path"] == str(params) and printed["attainable"] == json.loads(params.read_text())["attainable"]
    )


@pytest.mark.parametrize(
    "args",
    [
        ["calibrate", "--scores", "{calib}"],  # no --out
        ["calibrate", "--out", "{tmp}/p.json"],  # --out without --scores
        ["calibrate", "--scores", "{tmp}/missing.csv", "--out", "{tmp}/p.json"],
        ["calibrate", "--scores", "{calib}", "--out", "{tmp}/p.json", "--fnr", "1.5"],
        ["evaluate", "--scores", "{calib}", "--out", "{tmp}/r.json"],  # no --params
        ["evaluate", "--scores", "{calib}", "--params", "{tmp}/missing.json", "--out", "{tmp}/r.json"],
        ["evaluate", "--run", "{tmp}/run", "--split", "test", "--source", "synthetic:4"],
    ],
)
def test_bad_usage_exits_2(scores: dict[str, Path], tmp_path: Path, args: list[str]) -> None:
    args = [a.format(calib=scores["calib"], tmp=tmp_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_bad_row_exits_2_naming_the_row(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("p_roadwork,gate,label\n0.3,0.9,1\n0.2,0.4,yes\n")
    result = runner.invoke(app, ["calibrate", "--scores", str(bad), "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2
    assert "row 3" in result.output


def test_run_mode_calibrate_and_evaluate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for split, n, seed in (("val_select", 600, 3), ("val_calib", 2000, 4), ("test", 500, 5)):
        write_scores(run / "scores" / f"{split}.csv", n, seed)
    result = runner.invoke(app, ["calibrate", "--run", str(run), "--fnr", "0.05", "--coverage", "0.7"])
    assert result.exit_code == 0, result.output
    assert (run / "calibration" / "scaling.json").exists() and (run / "calibration" / "scrc_params.json").exists()
    assert (run / "config.yaml").exists()
    result = runner.invoke(app, ["evaluate", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval" / "report.json").read_text())["split"] == "test"
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--split", "val_calib"])
    assert (
        result.exit_code == 0
        and json.loads((run / "eval" / "split-val_calib" / "report.json").read_text())["n"] == 2000
    )
    assert json.loads((run / "eval" / "report.json").read_text())["split"] == "test"  # not overwritten


def test_scores_mode_never_imports_torch(scores: dict[str, Path], tmp_path: Path) -> None:
    params, report = tmp_path / "params.json", tmp_path / "report.json"
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from roadwork_cli.cli.app import app\n"
        "runner = CliRunner()\n"
        f"r = runner.invoke(app, ['calibrate', '--scores', {str(scores['calib'])!r}, '--out', {str(params)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        f"r = runner.invoke(app, ['evaluate', '--scores', {str(scores['test'])!r}, '--params', {str(params)!r},"
        f" '--out', {str(report)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(','.join(m for m in ('torch', 'timm', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    assert report.exists()


def _evaluate_strict(scores: dict[str, Path], params: Path, tmp_path: Path, *extra: str):
    out = tmp_path / "strict" / "report.json"
    args = ["evaluate", "--scores", str(scores["test"]), "--params", str(params), "--out", str(out), *extra]
    return runner.invoke(app, args), out


def test_evaluate_strict_fails_without_a_certified_guarantee(scores: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params)]
    result = runner.invoke(app, [*args, "--fnr", "0.0005", "--coverage", "0.95", "--allow-infeasible"])
    assert result.exit_code == 0, result.output
    result, out = _evaluate_strict(scores, params, tmp_path)
    assert result.exit_code == 0, result.output  # without --strict the report is just written
    assert "no guarantee (targets not certified)" in flat(result.output) and "satisfied" not in result.output
    result, out = _evaluate_strict(scores, params, tmp_path, "--strict")
    assert result.exit_code == 1, result.output
    assert "not certified" in flat(result.output) and "Traceback" not in result.output
    assert json.loads(out.read_text())["guarantee"]["certified"] is False  # written before failing


def test_evaluate_strict_passes_when_certified_and_met_and_fails_when_missed(
    scores: dict[str, Path], tmp_path: Path
) -> None:
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params), "--fnr", "0.05", "--coverage", "0.7"]
    assert runner.invoke(app, args).exit_code == 0
    result, out = _evaluate_strict(scores, params, tmp_path, "--strict")
    guarantee = json.loads(out.read_text())["guarantee"]
    assert guarantee["certified"] is True and guarantee["satisfied"] is True
    assert result.exit_code == 0, result.output
    # The same certified params on data the model gets wrong (labels flipped): certified, but not met -> exit 1.
    flipped = tmp_path / "flipped.csv"
    rows = scores["test"].read_text().splitlines()
    header = rows[0].split(",")
    label = header.index("label")
    lines = [rows[0]] + [",".join(f if i != label else str(1 - int(f)) for i, f in enumerate(r.split(",")))
                         for r in rows[1:]]  # fmt: skip
    flipped.write_text("\n".join(lines) + "\n")
    result, out = _evaluate_strict({"test": flipped}, params, tmp_path, "--strict")
    assert result.exit_code == 1, result.output
    assert "not met on this data" in flat(result.output)
    assert json.loads(out.read_text())["guarantee"]["satisfied"] is False


def test_export_refusal_says_how_the_calibration_came_to_be_uncertified(tmp_path: Path) -> None:
    from cli_helpers import make_tiny_run

    run = make_tiny_run(tmp_path / "run")
    for split, n, seed in (("val_select", 300, 3), ("val_calib", 400, 4)):
        write_scores(run.scores / f"{split}.csv", n, seed)
    strict = ["calibrate", "--run", str(run.root), "--fnr", "0.0005"]
    assert runner.invoke(app, strict).exit_code == 3
    refused = runner.invoke(app, ["export", "--run", str(run.root)])
    assert refused.exit_code == 2 and not run.bundle.exists()
    assert "exited 3" in flat(refused.output) and "from `calibrate --allow-infeasible`" not in flat(refused.output)
    assert runner.invoke(app, [*strict, "--allow-infeasible"]).exit_code == 0
    refused = runner.invoke(app, ["export", "--run", str(run.root)])
    assert refused.exit_code == 2 and "`roadwork calibrate --allow-infeasible` wrote" in flat(refused.output)


def test_no_roadwork_among_the_exits_is_not_testable_never_satisfied(scores: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params), "--fnr", "0.05", "--coverage", "0.7"]
    assert runner.invoke(app, args).exit_code == 0
    negatives = tmp_path / "negatives.csv"  # the test split without its roadwork images
    rows = scores["test"].read_text().splitlines()
    negatives.write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[3] == "0"]) + "\n")
    result, out = _evaluate_strict({"test": negatives}, params, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    guarantee = report["guarantee"]
    assert guarantee["certified"] is True and guarantee["exited_positives"] == 0 and guarantee["coverage_satisfied"]
    assert guarantee["satisfied"] is None and guarantee["fnr_satisfied"] is None and guarantee["fnr_testable"] is False
    assert guarantee["fnr_upper"] is None and report["fnr_on_exits"] is None
    assert "not testable on this data" in guarantee["verdict"] and "not testable" in flat(result.output)
    page = (out.parent / "report.html").read_text()
    assert "Certified; satisfied" not in page and '<span class="ok">' not in page
    result, _ = _evaluate_strict({"test": negatives}, params, tmp_path, "--strict")
    assert result.exit_code == 1 and "not testable" in flat(result.output)


def test_a_calibration_of_another_models_scores_is_refused_until_recalibrated(tmp_path: Path) -> None:
    """The field trial's sequence: calibrate -> cache-features --backbone tiny_vit -> train -> export / evaluate."""
    from roadwork_cli.errors import UsageError
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.stage1 import Stage1Model

    run = tmp_path / "run"
    flags = ["--run", str(run), "--device", "cpu", "--threads", "1"]
    allow = ["--allow-infeasible"]  # 40 images cannot certify 2 % FNR; staleness is what is tested here
    steps = [
        ["split", "--source", "synthetic:40", "--run", str(run)],
        ["cache-features", *flags, "--backbone", "efficientnet_lite0", "--workers", "0"],
        ["train", *flags, "--mode", "train_cached", "--epochs", "1"],
        ["calibrate", "--run", str(run), *allow],
    ]
    for args in steps:
        assert runner.invoke(app, args).exit_code == 0, args
    fitted_on = json.loads((run / "calibration" / "scrc_params.json").read_text())["data"]["fingerprints"]
    assert set(fitted_on) == {"scores/val_select.csv", "scores/val_calib.csv"}
    assert json.loads((run / "provenance.json").read_text())["stages"]["calibrate"] == fitted_on
    for args in (
        ["cache-features", *flags, "--backbone", "tiny_vit", "--workers", "0"],
        ["train", *flags, "--epochs", "1"],
    ):
        assert runner.invoke(app, args).exit_code == 0, args

    export = runner.invoke(app, ["export", "--run", str(run), "--allow-uncertified"])
    assert export.exit_code == 2 and not (run / "bundle.tar").exists()
    assert "roadwork calibrate --run" in flat(export.output) and "scores/val_calib.csv changed" in flat(export.output)
    evaluate = runner.invoke(app, ["evaluate", *flags])
    assert evaluate.exit_code == 2 and "roadwork calibrate --run" in flat(evaluate.output)
    with pytest.raises(UsageError, match="roadwork calibrate --run"):
        Stage1Model.from_run(RunDir(run), device="cpu")

    assert runner.invoke(app, ["calibrate", "--run", str(run), *allow]).exit_code == 0
    assert runner.invoke(app, ["evaluate", *flags]).exit_code == 0
    export = runner.invoke(app, ["export", "--run", str(run), "--allow-uncertified"])
    assert export.exit_code == 0, export.output


def test_flags_not_given_leave_the_environment_in_charge(scores: dict[str, Path], tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    args = ["calibrate", "--scores", str(scores["calib"]), "--out", str(params), "--allow-infeasible"]
    env = {"ROADWORK_CALIBRATION__FNR": "0.07", "ROADWORK_CALIBRATION__COVERAGE": "0.6"}
    assert runner.invoke(app, [*args, "--coverage", "0.65"], env=env).exit_code == 0
    targets = json.loads(params.read_text())["targets"]
    assert (targets["alpha"], targets["xi"], targets["delta"]) == (0.07, 0.65, 0.1)  # env, flag, default
