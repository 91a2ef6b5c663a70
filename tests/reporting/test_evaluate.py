from __future__ import annotations

import base64
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from split_helpers import write_splits

from roadwork_cli.calibration.api import calibrate_run, calibrate_scores
from roadwork_cli.config import CalibrationSettings
from roadwork_cli.errors import UsageError
from roadwork_cli.io.run import RunDir
from roadwork_cli.reporting.evaluate import compute_report, evaluate_run, evaluate_scores
from roadwork_cli.reporting.tables import calibration_table, report_table

REQUIRED_KEYS = {
    "n", "accuracy", "mcc", "auroc", "ece", "coverage", "accuracy_on_exits", "fnr_on_exits", "fpr_on_exits",
    "risk_at_coverage", "coverage_at_risk", "avg_set_size", "aurc", "guarantee", "aurc_gate", "aurc_softmax_response",
}  # fmt: skip
SETTINGS = CalibrationSettings(fnr=0.05, coverage=0.7, delta=0.1)


def synthetic_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    g = rng.random(n)
    z = (2 * y - 1) * (1 + 5 * g) + rng.normal(size=n)
    return 1 / (1 + np.exp(-z)), g, y


def write_csv(path: Path, ids: list[str], p, g, y) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "p_roadwork", "gate"])
        for row in zip(ids, y, p, g, strict=True):
            writer.writerow([row[0], int(row[1]), f"{row[2]:.8f}", f"{row[3]:.8f}"])
    return path


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    """A calibrated run with scores for every split and a splits.json whose test images exist (a few are broken)."""
    run = RunDir(tmp_path / "run").ensure()
    samples, splits = {}, {"train": [], "val_select": [], "val_calib": [], "test": []}
    images = tmp_path / "images"
    images.mkdir()
    for split, n, seed in (("val_select", 800, 1), ("val_calib", 1500, 2), ("test", 600, 3)):
        p, g, y = synthetic_scores(n, seed)
        ids = []
        for i in range(n):
            if split == "test":
                path = images / f"{i}.png"
                if i % 7 == 0:
                    path.write_bytes(b"not an image")  # unreadable: its tile is skipped, the report still works
                else:
                    Image.new("RGB", (24, 16), (i % 255, 80, 160)).save(path)
                sid = hashlib.sha256(path.read_bytes() + str(i).encode()).hexdigest()
            else:
                path, sid = images / f"{split}-{i}.png", f"{split}-{i}"
            ids.append(sid)
            samples[sid] = {"path": str(path), "label": int(y[i]), "source": str(images), "group": None}
        splits[split] = ids
        write_csv(run.scores / f"{split}.csv", ids, p, g, y)
    write_splits(run, splits, samples)
    calibrate_run(run, SETTINGS)
    return run


def test_evaluate_run_writes_report_plots_and_self_contained_html(run: RunDir) -> None:
    report = evaluate_run(run, None, split="test")
    on_disk = json.loads(run.report.read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert REQUIRED_KEYS <= set(on_disk)
    guarantee = on_disk["guarantee"]
    assert set(guarantee) >= {"alpha", "delta", "xi", "satisfied", "fnr_upper", "coverage_lower"}
    assert (guarantee["alpha"], guarantee["xi"], guarantee["delta"]) == (0.05, 0.7, 0.1)
    expected = (on_disk["fnr_on_exits"] is None or on_disk["fnr_on_exits"] <= 0.05) and on_disk["coverage"] >= 0.7
    assert guarantee["satisfied"] == expected
    assert guarantee["coverage_lower"] <= on_disk["coverage"]
    for name in ("risk_coverage.png", "reliability.png", "score_histograms.png", "examples.png", "report.html"):
        assert (run.eval / name).stat().st_size > 0, name
    html = (run.eval / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing external
    embedded = html.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(embedded).startswith(b"\x89PNG")
    assert html.count("data:image/png;base64,") == 4


def test_report_metrics_match_a_direct_computation(run: RunDir) -> None:
    from roadwork_cli.calibration.api import read_scores_csv
    from roadwork_cli.calibration.estimator import SelectiveConformal

    rule = SelectiveConformal.load(run.scaling, run.scrc_params)
    table = read_scores_csv(run.scores / "test.csv")
    report = compute_report(table, rule)
    p, g = rule.calibrate(table.p, table.gate)
    exits = g >= rule.lam
    y = table.label
    roadwork = p >= rule.tau
    assert report["coverage"] == pytest.approx(exits.mean())
    assert report["fnr_on_exits"] == pytest.approx(np.mean(~roadwork[exits & (y == 1)]))
    assert report["fpr_on_exits"] == pytest.approx(np.mean(roadwork[exits & (y == 0)]))
    assert report["accuracy"] == pytest.approx(np.mean((p >= 0.5) == (y == 1)))
    assert report["avg_set_size"] == pytest.approx(2 - exits.mean())
    assert report["decisions"]["defer"] == int((~exits).sum())


def test_evaluate_scores_with_embedded_scaling(tmp_path: Path) -> None:
    p, g, y = synthetic_scores(2000, 5)
    calib = write_csv(tmp_path / "calib.csv", [str(i) for i in range(2000)], p, g, y)
    calibrate_scores(calib, tmp_path / "params.json", SETTINGS)
    p, g, y = synthetic_scores(1000, 6)
    test = write_csv(tmp_path / "test.csv", [str(i) for i in range(1000)], p, g, y)
    report = evaluate_scores(test, tmp_path / "params.json", tmp_path / "out" / "report.json")
    assert REQUIRED_KEYS <= set(report)
    assert (tmp_path / "out" / "report.json").exists() and (tmp_path / "out" / "report.html").exists()
    assert not (tmp_path / "out" / "examples.png").exists()  # no run, no images


def test_evaluate_run_errors(run: RunDir, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Unknown split"):
        evaluate_run(run, None, split="bogus")
    uncalibrated = RunDir(tmp_path / "uncalibrated")
    write_csv(uncalibrated.scores / "test.csv", ["a"], [0.5], [0.5], [1])
    with pytest.raises(UsageError, match="roadwork calibrate"):
        evaluate_run(uncalibrated, None, split="test")
    with pytest.raises(UsageError, match="roadwork train"):
        evaluate_run(uncalibrated, None, split="val_calib")


def test_tables_render(run: RunDir) -> None:
    from rich.console import Console

    report = evaluate_run(run, None)
    console = Console(record=True, width=300)
    console.print(report_table(report))
    console.print(calibration_table(json.loads(run.scrc_params.read_text())))
    text = console.export_text()
    assert "FNR on exits" in text and "<= 0.0500" in text and "then roadwork iff p >=" in text
    assert "certified: FNR on exits <= 0.05, coverage >= 0.7" in text
    assert "Stage 1 exits" in text  # the operating point in words, as the table's caption


def test_evaluate_source_scores_through_stage1_and_reports(run: RunDir, monkeypatch) -> None:
    import sys
    import types

    from roadwork_cli.reporting.evaluate import evaluate_source

    calls = []

    def fake_score_source(run_dir, source, settings, out_csv, progress=False):
        calls.append(source)
        p, g, y = synthetic_scores(300, 11)
        rejected = [{"path": "a.jpg", "reason": "truncated (12 bytes)"}, {"path": "b.png", "reason": "unreadable: x"}]
        Path(out_csv).with_suffix(".rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
        return write_csv(Path(out_csv), [f"s{i}" for i in range(300)], p, g, y)

    monkeypatch.setitem(sys.modules, "roadwork_cli.scoring", types.SimpleNamespace(score_source=fake_score_source))
    test_report = evaluate_run(run, None, split="test")
    report = evaluate_source(run, "synthetic:300", None)
    assert calls == ["synthetic:300"]
    assert report["n"] == 300 and report["source"] == "synthetic:300"
    assert report["rejected"] == {
        "count": 2, "by_reason": {"truncated": 1, "unreadable": 1}, "file": "scores.rejected.jsonl"
    }  # fmt: skip
    beside = run.eval / "source-synthetic-300"
    assert json.loads((beside / "report.json").read_text())["source"] == "synthetic:300"
    assert (beside / "report.html").exists() and (beside / "scores.csv").exists()
    # The test split's report stays where the contract puts it, untouched.
    assert json.loads(run.report.read_text()) == json.loads(json.dumps(test_report))


def test_guarantee_statement_claims_only_what_was_certified() -> None:
    from roadwork_cli.reporting.tables import NO_GUARANTEE, guarantee_statement

    targets = {"alpha": 0.02, "xi": 0.8, "delta": 0.1}
    certified = guarantee_statement({"method": "scrc", "feasible": True, "targets": targets})
    assert certified == "certified: FNR on exits <= 0.02 and coverage >= 0.8 with probability >= 0.9"
    for params, then in (
        ({"method": "crc", "feasible": True}, "does not certify"),  # a bound in expectation only
        ({"method": "scrc", "feasible": False}, "every image is deferred"),  # the default infeasible decisions
        ({"method": "scrc", "feasible": False, "infeasible_decisions": "fallback"}, "fallback thresholds"),
        ({"method": "scrc", "feasible": True, "certified": {"targets": False}}, ""),  # the recorded certificate
    ):
        statement = guarantee_statement({**params, "targets": targets})
        assert statement.startswith(NO_GUARANTEE) and then in statement and "certified:" not in statement
    assert guarantee_statement({"method": "scrc"}) is None  # no outcome recorded


def test_calibration_table_lists_only_the_thresholds_its_rule_uses() -> None:
    from rich.console import Console

    def rows(params: dict) -> list[str]:
        console = Console(record=True, width=200)
        console.print(calibration_table(params))
        return [line.split("│")[1].strip() for line in console.export_text().splitlines() if line.startswith("│")]

    band = rows({"method": "scrc", "rule": "band", "feasible": True, "thresholds": {"tau": 0.01, "b": 0.05}})
    assert {"tau", "b"} <= set(band) and "lambda" not in band and "selection score" not in band
    gate = rows({"method": "scrc", "feasible": True, "gate_score": "gate", "thresholds": {"lambda": 0.3, "tau": 0.5}})
    assert {"lambda", "tau", "selection score"} <= set(gate) and "b" not in gate


def _visible(html_text: str) -> str:
    """The HTML's verdicts: without the glossary (which defines "certified" and "satisfied") and the embedded
    report.json (whose keys are named so)."""
    return html_text.split("<h2>Glossary</h2>")[0]


def test_html_says_what_stage1_does_explains_terms_and_counts_decisions(run: RunDir) -> None:
    import re

    from roadwork_cli.reporting.tables import GLOSSARY

    report = evaluate_run(run, None, split="test")
    page = _visible((run.eval / "report.html").read_text())
    counts = report["decisions"]
    exits = counts["roadwork"] + counts["no_roadwork"]
    sentence = re.search(r'<p class="headline">(.*?)</p>', page).group(1)
    assert f"exits {100 * exits / report['n']:.1f} %" in sentence and f"defers {counts['defer']}" in sentence
    assert f"p &gt;= {report['thresholds']['tau']:.4g}" in sentence  # the threshold, in the same sentence
    full = (run.eval / "report.html").read_text()
    for term, _ in GLOSSARY:
        assert f"<dt>{term}</dt>" in full
    for decision, by_label in report["decision_counts"].items():
        row = f"<td>{decision}</td><td>{by_label['roadwork']}</td><td>{by_label['no_roadwork']}</td>"
        assert row in page
        assert by_label["roadwork"] + by_label["no_roadwork"] == counts[decision]
    assert "Certified; satisfied on this data" in page or "Certified, but NOT satisfied" in page
    assert "operating point" in page and "<figcaption>" in page


def test_uncertified_run_is_never_called_satisfied_or_certified(run: RunDir) -> None:
    from rich.console import Console

    hard = SETTINGS.model_copy(update={"fnr": 0.0005, "coverage": 0.95, "allow_infeasible": True})
    calibrate_run(run, hard)
    report = evaluate_run(run, None, split="test")
    assert report["guarantee"]["certified"] is False
    assert report["guarantee"]["verdict"] == "no guarantee (targets not certified)"
    assert report["decisions"]["defer"] == report["n"]  # the safe default: an uncertified run defers everything
    assert report["guarantee"]["satisfied"] is False
    page = _visible((run.eval / "report.html").read_text())
    console = Console(record=True, width=300)
    console.print(report_table(report))
    console.print(calibration_table(json.loads(run.scrc_params.read_text())))
    for text in (page, console.export_text()):
        assert "no guarantee (targets not certified)" in text.lower()
        assert "satisfied" not in text.lower()
        # "certified" only ever appears negated.
        assert text.lower().count("certified") == text.lower().count("not certified") + text.lower().count(
            "uncertified"
        )
    # With the fallback thresholds the observed rates may meet the targets, yet nothing says "satisfied".
    calibrate_run(run, hard.model_copy(update={"infeasible_decisions": "fallback", "coverage": 0.5}))
    report = evaluate_run(run, None, split="test")
    assert report["decisions"]["defer"] < report["n"]
    page = _visible((run.eval / "report.html").read_text())
    assert "no guarantee (targets not certified)" in page.lower() and "satisfied" not in page.lower()
