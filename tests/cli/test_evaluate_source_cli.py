"""``roadwork evaluate --run DIR --source FOLDER`` end to end through the CLI, the real model scoring the images."""

from __future__ import annotations

import json

from cli_helpers import make_tiny_run, write_images
from typer.testing import CliRunner

from roadwork_cli.cli.app import app

runner = CliRunner()


def test_evaluate_source_scores_readable_images_beside_the_test_report(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    run.eval.mkdir(parents=True, exist_ok=True)
    test_report = b'{"n": 123, "split": "test"}\n'
    run.report.write_bytes(test_report)  # the test split's report must survive an evaluation on another source

    source = tmp_path / "street photos"  # a space: the report folder's slug must not carry it
    good = write_images(source / "roadwork", n=3) + write_images(source / "no_roadwork", n=2, size=(64, 80))
    truncated = source / "roadwork" / "cut.jpg"
    truncated.write_bytes(good[0].read_bytes()[:150])
    empty = source / "no_roadwork" / "empty.jpg"
    empty.write_bytes(b"")
    not_an_image = source / "no_roadwork" / "notes.png"
    not_an_image.write_text("not a picture")
    unreadable = {str(truncated), str(empty), str(not_an_image)}

    result = runner.invoke(app, ["evaluate", "--run", str(run.root), "--source", str(source), "--json"])
    assert result.exit_code == 0, result.output

    out_dir = run.eval / "source-street-photos"
    report = json.loads((out_dir / "report.json").read_text())
    assert run.report.read_bytes() == test_report
    assert report["n"] == len(good) and report["source"] == str(source) and report["split"] is None
    assert json.loads(result.stdout)["report_path"] == str(out_dir / "report.json")
    assert {"coverage", "fnr_on_exits", "guarantee", "aurc"} <= set(report)

    scored = (out_dir / "scores.csv").read_text().splitlines()
    assert scored[0] == "id,path,label,p_roadwork,gate"
    labels = {row.split(",")[1]: row.split(",")[2] for row in scored[1:]}
    assert labels == {str(p): "1" if p.parent.name == "roadwork" else "0" for p in good}

    rejected = [json.loads(line) for line in (out_dir / "scores.rejected.jsonl").read_text().splitlines()]
    assert {r["path"] for r in rejected} == unreadable
    assert all(isinstance(r["reason"], str) and r["reason"].strip() for r in rejected)
    # Counted in the report and said on the terminal, not only in the file beside it.
    assert report["rejected"]["count"] == 3 and sum(report["rejected"]["by_reason"].values()) == 3
    assert report["rejected"]["file"] == "scores.rejected.jsonl"
    assert "3 input(s) could not be read" in " ".join(result.output.split())


def test_evaluate_source_with_nothing_readable_is_bad_input(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    source = tmp_path / "broken"
    (source / "roadwork").mkdir(parents=True)
    (source / "roadwork" / "empty.jpg").write_bytes(b"")
    result = runner.invoke(app, ["evaluate", "--run", str(run.root), "--source", str(source)])
    assert result.exit_code == 2, result.output
    assert "No usable image" in result.output and "Traceback" not in result.output
    assert not run.report.exists()


def _write_scores(path, n: int, seed: int) -> None:
    """A scores CSV whose gate ranks correctness (enough for calibrate to certify loose targets)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    g = rng.random(n)
    p = 1 / (1 + np.exp(-((2 * y - 1) * (1 + 5 * g) + rng.normal(size=n))))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"s{seed}_{i},{p[i]:.6f},{g[i]:.6f},{y[i]}" for i in range(n)]
    path.write_text("id,p_roadwork,gate,label\n" + "\n".join(rows) + "\n")


def test_evaluate_split_writes_its_own_folder_and_leaves_the_test_report_alone(tmp_path):
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.reporting.evaluate import add_to_report

    run = RunDir(tmp_path / "run")
    for split, n, seed in (("val_select", 300, 3), ("val_calib", 1200, 4), ("test", 200, 5)):
        _write_scores(run.scores / f"{split}.csv", n, seed)
    assert runner.invoke(app, ["calibrate", "--run", str(run.root), "--fnr", "0.1", "--coverage", "0.5"]).exit_code == 0
    assert runner.invoke(app, ["evaluate", "--run", str(run.root)]).exit_code == 0
    # The test report with a robustness block and its figure, as `evaluate --robustness` leaves them.
    figure = run.eval / "robustness.png"
    figure.write_bytes((run.eval / "reliability.png").read_bytes())
    add_to_report(run.report, {"robustness": {"note": "measured"}}, {"robustness": figure})
    before = {name: (run.eval / name).read_bytes() for name in ("report.json", "report.html", "robustness.png")}

    result = runner.invoke(app, ["evaluate", "--run", str(run.root), "--split", "val_calib", "--json"])
    assert result.exit_code == 0, result.output
    assert {name: (run.eval / name).read_bytes() for name in before} == before  # the test report is untouched
    out = run.eval / "split-val_calib"
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "val_calib" and report["n"] == 1200 and "robustness" not in report
    assert json.loads(result.stdout)["report_path"] == str(out / "report.json")
    assert (out / "report.html").is_file() and (out / "risk_coverage.png").is_file()
    assert not (out / "robustness.png").exists()
    assert set(report["files"].values()) == {p.name for p in out.iterdir() if p.suffix in (".png", ".html")}

    # Evaluating the test split again without --robustness: no robustness block, and no figure of the old one left.
    assert runner.invoke(app, ["evaluate", "--run", str(run.root)]).exit_code == 0
    assert "robustness" not in json.loads(run.report.read_text())
    assert not figure.exists()
    assert json.loads((out / "report.json").read_text())["n"] == 1200  # the other split's report stays

    # --out into a folder of the user's: their own files are not ours to remove, even under a figure's name.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "robustness.png").write_bytes(b"the user's own picture")
    scores_mode = ["evaluate", "--scores", str(run.scores / "test.csv"), "--params", str(run.scrc_params)]
    assert runner.invoke(app, [*scores_mode, "--out", str(mine / "report.json")]).exit_code == 0
    assert (mine / "robustness.png").read_bytes() == b"the user's own picture"
