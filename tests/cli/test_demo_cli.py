"""roadwork demo end to end with a tiny backbone, and its settings layering."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from roadwork_cli.cli.app import app

runner = CliRunner()
TINY = {
    "ROADWORK_MODEL__BACKBONE": "tiny_vit",
    "ROADWORK_CALIBRATION__ALLOW_INFEASIBLE": "true",
    "ROADWORK_EXPORT__ALLOW_UNCERTIFIED": "true",  # 80 synthetic images cannot certify the targets
}


def test_demo_settings_layering(tmp_path):
    from roadwork_cli.pipeline import DEMO_PER_CLASS, demo_settings

    settings = demo_settings(None, environ={})
    assert settings.data.sources == [f"synthetic:{2 * DEMO_PER_CLASS}"]
    assert settings.data.fractions == (0.4, 0.1, 0.3, 0.2)
    assert str(settings.runtime.run) == "runs/demo"
    config = tmp_path / "demo.yaml"
    config.write_text("data:\n  fractions: [0.5, 0.1, 0.2, 0.2]\nruntime:\n  run: elsewhere\n")
    settings = demo_settings(config, per_class=10, environ={"ROADWORK_CALIBRATION__FNR": "0.05"})
    assert settings.data.fractions == (0.5, 0.1, 0.2, 0.2)  # the user's YAML beats the demo defaults
    assert settings.calibration.fnr == 0.05  # environment beats both
    assert settings.data.sources == ["synthetic:20"] and str(settings.runtime.run) == "elsewhere"
    assert str(demo_settings(config, per_class=10, run=tmp_path / "x", environ={}).runtime.run) == str(tmp_path / "x")


def test_demo_device_and_threads_flags_beat_the_environment_and_are_validated():
    from roadwork_cli.errors import UsageError
    from roadwork_cli.pipeline import demo_settings

    environ = {"ROADWORK_RUNTIME__THREADS": "3", "ROADWORK_RUNTIME__DEVICE": "cpu"}
    from_env = demo_settings(None, environ=environ)
    assert (from_env.runtime.threads, from_env.runtime.device) == (3, "cpu")  # flags not given: lower layers stand
    flagged = demo_settings(None, environ=environ, device="auto", threads=2)
    assert (flagged.runtime.threads, flagged.runtime.device) == (2, "auto")
    with pytest.raises(UsageError, match="threads"):
        demo_settings(None, environ={}, threads=0)


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end_and_reruns(tmp_path):
    run = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--run", str(run), "--per-class", "40"], env=TINY)
    assert result.exit_code == 0, result.output
    for artifact in ("splits.json", "checkpoints/best.safetensors", "calibration/scrc_params.json", "bundle.tar"):
        assert (run / artifact).is_file(), artifact
    report = json.loads((run / "eval" / "report.json").read_text())
    assert {"coverage", "fnr_on_exits", "guarantee"} <= set(report)
    assert "predict from the bundle" in result.output and "bundle.tar" in result.output
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["samples"]) == 80

    # Re-running re-uses the rendered scenes, cached features and finished training.
    reused = [*(run / "synthetic").rglob("*.jpg"), *(run / "features").rglob("*.safetensors")]
    assert len(reused) > 80
    stamps = {p: p.stat().st_mtime_ns for p in reused}
    params_before = (run / "calibration" / "scrc_params.json").read_text()
    again = runner.invoke(app, ["demo", "--run", str(run), "--per-class", "40", "--json", "--threads", "1"], env=TINY)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)  # --json: one object on stdout, the stage tables stay on stderr
    assert summary["bundle"] == str(run / "bundle.tar") and summary["report"]["n"] == report["n"]
    assert list(summary["stages"]) == ["split", "cache-features", "train", "calibrate", "evaluate", "export", "predict"]
    assert len(summary["predictions"]) == 8 and {"decision", "label"} <= set(summary["predictions"][0])
    assert "threads: 1" in (run / "config.yaml").read_text()
    assert {p: p.stat().st_mtime_ns for p in reused} == stamps
    assert (run / "calibration" / "scrc_params.json").read_text() == params_before  # same end result

    predicted = runner.invoke(
        app, ["predict", str(run / "synthetic"), "--bundle", str(run / "bundle.tar"), "--format", "jsonl"]
    )
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.splitlines()) == 80


def test_demo_rejects_bad_per_class(tmp_path):
    result = runner.invoke(app, ["demo", "--run", str(tmp_path / "d"), "--per-class", "0"], env=TINY)
    assert result.exit_code == 2
