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
