"""Evaluation of calibrated stage 1 on a split (or any scores CSV): metrics, the guarantee check, plots, HTML.

Torch-free: the inputs are raw score CSVs (``scores/<split>.csv`` from training, or ``score_source`` output) plus the
calibration JSON. Only ``--source`` mode asks the model layer (``roadwork_cli.scoring.score_source``) for scores; its
report goes beside the test split's, to ``eval/source-<slug>/report.json``. The test split's report is
``eval/report.json``; another split's goes to ``eval/split-<split>/report.json`` (:meth:`RunDir.split_report`). A
report's folder holds only the figures of that report: those the earlier report there listed and this one does not
write are removed.

``guarantee.satisfied`` says whether the observed rates on this data meet the targets (null when FNR on exits is not
testable: no roadwork image exits); ``guarantee.certified`` says whether calibration certified them. Only a certified
run is ever shown as having a guarantee.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from roadwork_cli.calibration.api import ScoreTable, load_run_calibration, read_scores_csv
from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.calibration.scaling import softmax_response
from roadwork_cli.calibration.stats import clopper_pearson_lower, clopper_pearson_upper
from roadwork_cli.errors import RoadworkError, UsageError
from roadwork_cli.io.atomic import atomic_write_json, json_safe
from roadwork_cli.io.run import RunDir
from roadwork_cli.metrics import classification as cm
from roadwork_cli.metrics import selective as sm
from roadwork_cli.reporting.tables import UNTESTABLE, describe_operating_point, guarantee_verdict

ECE_BINS = 15


def compute_report(table: ScoreTable, rule: SelectiveConformal) -> dict[str, Any]:
    """Every metric of report.json for raw scores ``table`` under ``rule`` (no files written).

    Single-stage metrics (accuracy, mcc, auroc, ece, brier) use the calibrated p on every image with p >= 0.5.
    Selective metrics use the rule's decisions; the risk of the risk-coverage curve is the error of the decision
    p >= tau, with the rule's selection score (``aurc``), the calibrated gate (``aurc_gate``) or max(p, 1 - p)
    (``aurc_softmax_response``) ranking the images.
    """
    labels = table.label.astype(int)
    p, g = rule.calibrate(table.p, table.gate)
    decisions = rule.predict(table.p, table.gate)
    exits = decisions != "defer"
    predictions = (decisions == "roadwork").astype(int)
    single = (p >= 0.5).astype(int)
    params = rule.params
    certified = params.get("certified") or {}
    targets = params.get("targets", {})
    alpha = float(targets.get("alpha", float("nan")))
    delta = float(targets.get("delta", float("nan")))
    xi = float(targets.get("xi", float("nan")))

    tau = rule.tau if rule.tau is not None else 0.5
    # Error of the exit decision, for every image. Under the band rule an exit has p < tau or p >= b >= tau, so
    # p >= tau is its decision too.
    losses = ((p >= tau).astype(int) != labels).astype(float)
    gate_calibrated = rule.gate_scaler.transform(table.gate)
    avg_set = float(rule.set_sizes(table.p, table.gate).mean())

    k, m = sm.fnr_counts(labels, predictions, exits)
    n, n_exit = int(labels.size), int(exits.sum())
    fnr = sm.fnr_on_exits(labels, predictions, exits)
    cov = sm.coverage(exits)
    # With no roadwork image among the exits FNR on exits is undefined: the FNR target is not testable on this data,
    # so neither it nor the guarantee as a whole can be called satisfied (None), only refuted by a coverage miss.
    fnr_ok = bool(fnr <= alpha) if m else None
    coverage_ok = bool(cov >= xi)
    satisfied = None if fnr_ok is None and coverage_ok else bool(fnr_ok and coverage_ok)
    report: dict[str, Any] = {
        "n": n,
        "n_pos": int(labels.sum()),
        "accuracy": cm.accuracy(labels, single),
        "mcc": cm.mcc(labels, single),
        "auroc": (cm.auroc(labels, p)),
        "ece": cm.ece(labels, p, ECE_BINS),
        "brier": cm.brier(labels, p),
        "nll": cm.nll(labels, p),
        "coverage": cov,
        "accuracy_on_exits": (sm.accuracy_on_exits(labels, predictions, exits)),
        "fnr_on_exits": (fnr),
        "fpr_on_exits": (sm.fpr_on_exits(labels, predictions, exits)),
        "mcc_on_exits": cm.mcc(labels[exits], predictions[exits]) if n_exit else None,
        "risk_at_coverage": sm.risk_at_coverage(g, losses, xi) if math.isfinite(xi) else None,
        "coverage_at_risk": sm.coverage_at_risk(g, losses, alpha) if math.isfinite(alpha) else None,
        "selective_targets": {"coverage": (xi), "risk": (alpha)},
        "avg_set_size": avg_set,
        "aurc": sm.aurc(g, losses),
        "e_aurc": sm.e_aurc(g, losses),
        "aurc_gate": sm.aurc(gate_calibrated, losses),
        "aurc_softmax_response": sm.aurc(softmax_response(p), losses),
        "decisions": {d: int(np.sum(decisions == d)) for d in ("roadwork", "no_roadwork", "defer")},
        "decision_counts": {
            d: {
                "roadwork": int(np.sum((decisions == d) & (labels == 1))),
                "no_roadwork": int(np.sum((decisions == d) & (labels == 0))),
            }
            for d in ("roadwork", "no_roadwork", "defer")
        },  # fmt: skip
        "thresholds": dict(params.get("thresholds", {})),
        "calibration": {
            "method": params.get("method"),
            "rule": rule.rule,
            "rule_in_words": rule.describe(),
            "b": rule.b,
            # The band rule decides on p alone; the selection score then only ranks the risk-coverage curve.
            "gate_score": rule.gate_score if rule.decision_rule.uses_selection_score else None,
            "selection_score": rule.gate_score,
            "feasible": rule.feasible,
            "certified": rule.certified,
            "infeasible_decisions": "defer" if rule.defers_everything else None,
            # A Clopper-Pearson bound at the tau calibration picked: pointwise, not part of the certificate.
            "fnr_upper_pointwise": certified.get("fnr_upper_pointwise", certified.get("fnr_upper")),
            "certified_coverage_lower": certified.get("coverage_lower"),
        },
        "guarantee": {
            "alpha": (alpha),
            "delta": (delta),
            "xi": (xi),
            "certified": rule.certified,
            # What the certificate counted as independent draws: images, or groups (clips, near-duplicates).
            "unit": params.get("unit") or "images",
            "n_groups": params.get("n_groups"),
            "satisfied": satisfied,
            "fnr_satisfied": fnr_ok,
            "fnr_testable": bool(m),
            "coverage_satisfied": coverage_ok,
            "fnr_upper": float(clopper_pearson_upper(k, m, delta)) if m and math.isfinite(delta) else None,
            "coverage_lower": float(clopper_pearson_lower(n_exit, n, delta)) if math.isfinite(delta) else None,
            "exited_positives": m,
            "misses": k,
        },
    }
    report["guarantee"]["verdict"] = guarantee_verdict(report["guarantee"])
    report["summary"] = describe_operating_point(report)
    return json_safe(report)


def check_strict(report: dict[str, Any]) -> None:
    """``evaluate --strict``: fail unless calibration certified the targets and this data's rates meet them.

    Raises:
        RoadworkError: Exit code 1, naming which of the two failed.
    """
    guarantee = report.get("guarantee") or {}
    if not guarantee.get("certified"):
        raise RoadworkError(
            "--strict: no guarantee (targets not certified by calibration); re-calibrate with more val_calib data "
            "or looser --fnr/--coverage/--delta.",
            exit_code=1,
        )
    if guarantee.get("satisfied") is None:
        exits = sum(int((report.get("decisions") or {}).get(d, 0)) for d in ("roadwork", "no_roadwork"))
        raise RoadworkError(
            f"--strict: {UNTESTABLE}: none of its {exits} exits is a roadwork image, so the certified FNR target "
            "cannot be checked here. Evaluate on data that holds roadwork images.",
            exit_code=1,
        )
    if not guarantee.get("satisfied"):
        raise RoadworkError(
            f"--strict: the certified targets are not met on this data (FNR on exits {report.get('fnr_on_exits')} vs "
            f"alpha {guarantee.get('alpha')}, coverage {report.get('coverage')} vs xi {guarantee.get('xi')}).",
            exit_code=1,
        )


def _plots_and_html(
    out_dir: Path, table: ScoreTable, rule: SelectiveConformal, report: dict[str, Any], examples: list[dict[str, Any]]
) -> dict[str, Path]:
    from roadwork_cli.reporting import html, plots

    p, g = rule.calibrate(table.p, table.gate)
    tau = rule.tau if rule.tau is not None else 0.5
    losses = ((p >= tau).astype(int) != table.label).astype(float)
    exits_something = report["accuracy_on_exits"] is not None
    written = {
        "risk_coverage": plots.plot_risk_coverage(
            out_dir / "risk_coverage.png",
            {f"selection score ({rule.gate_score})": g, "softmax response max(p, 1 - p)": softmax_response(p)},
            losses,
            operating_point=(report["coverage"], 1.0 - report["accuracy_on_exits"]) if exits_something else None,
            xi=report["guarantee"]["xi"],
        ),
        "reliability": plots.plot_reliability(out_dir / "reliability.png", table.label, p),
        "histograms": plots.plot_score_histograms(out_dir / "score_histograms.png", table.label, p, g, rule),
    }
    if examples:
        grid = plots.plot_examples(out_dir / "examples.png", examples)
        if grid is not None:
            written["examples"] = grid
    written["html"] = html.write_report_html(out_dir / "report.html", report, written)
    return written


def _example_records(
    run: RunDir, table: ScoreTable, rule: SelectiveConformal, per_kind: int = 6
) -> list[dict[str, Any]]:
    """Up to ``per_kind`` missed roadwork, false alarms and deferrals, with their image locators."""
    if not table.ids:
        return []
    locators: dict[str, str] = {}
    if run.splits.exists():
        try:
            from roadwork_cli.data.splits import Splits

            splits = Splits.load(run.splits)
            locators = {sid: sample.path for sid, sample in splits.samples.items()}
        except Exception:  # noqa: BLE001 - examples are a nicety; the report must not fail over them
            locators = {}
    p, g = rule.calibrate(table.p, table.gate)
    decisions = rule.predict(table.p, table.gate)
    kinds = {
        "missed roadwork": (decisions == "no_roadwork") & (table.label == 1),
        "false alarm": (decisions == "roadwork") & (table.label == 0),
        "deferred": decisions == "defer",
    }
    records = []
    for kind, mask in kinds.items():
        # The most confident mistakes first (largest |p - 0.5|), deferrals by the lowest selection score.
        index = np.flatnonzero(mask)
        order = index[np.argsort(g[index])] if kind == "deferred" else index[np.argsort(-np.abs(p[index] - 0.5))]
        for i in order[:per_kind]:
            locator = locators.get(table.ids[i]) or (table.paths[i] if table.paths else "")
            if locator:
                records.append({"kind": kind, "locator": locator, "label": int(table.label[i]),
                                "p": float(p[i]), "g": float(g[i]), "id": table.ids[i]})  # fmt: skip
    return records


def _evaluate(
    table: ScoreTable, rule: SelectiveConformal, report_path: Path, examples_run: RunDir | None, extra: dict
) -> dict:
    report = compute_report(table, rule)
    report.update(extra)
    out_dir = report_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = _example_records(examples_run, table, rule) if examples_run is not None else []
    try:
        files = _plots_and_html(out_dir, table, rule, report, examples)
        report["files"] = {name: path.name for name, path in files.items()}
    except ImportError as exc:  # matplotlib missing: metrics still count
        files = {}
        report["files"] = {"error": f"plots skipped: {exc}"}
    # A figure (or page) of the earlier report here would pass for this one's: e.g. robustness.png after an evaluation
    # without --robustness, or examples.png where this one had no example to show. Only files that report listed go:
    # --out may point into a folder with files of the user's own.
    kept = {Path(path).name for path in files.values()}
    for name in _listed_files(report_path) - kept:
        (out_dir / name).unlink(missing_ok=True)
    atomic_write_json(report_path, report)
    return report


def _listed_files(report_path: Path) -> set[str]:
    """The file names (beside it) that an existing report.json lists under ``files``; none if it cannot be read."""
    try:
        listed = json.loads(Path(report_path).read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(listed, dict):
        return set()
    return {
        name
        for key, name in listed.items()
        if key != "error" and isinstance(name, str) and name and Path(name).name == name
    }


def add_to_report(report_path: Path, additions: dict[str, Any], figures: dict[str, Path] | None = None) -> dict:
    """Merge ``additions`` (e.g. the ``robustness`` block) into an existing report.json and render report.html again.

    Args:
        report_path: The report.json that ``evaluate_run`` wrote.
        additions: Top-level keys to add or replace.
        figures: Extra PNGs (name -> path beside the report) to embed in report.html.
    """
    from roadwork_cli.io.atomic import read_json
    from roadwork_cli.reporting import html

    report = read_json(report_path)
    report.update(json_safe(additions))
    out_dir = Path(report_path).parent
    files = {name: out_dir / file for name, file in (report.get("files") or {}).items() if (out_dir / file).is_file()}
    files.update(figures or {})
    files["html"] = html.write_report_html(out_dir / "report.html", report, files)
    report["files"] = {name: Path(path).name for name, path in files.items()}
    atomic_write_json(report_path, report)
    return report


def evaluate_run(run: RunDir | str | Path, settings=None, split: str = "test") -> dict[str, Any]:
    """Evaluate a calibrated run on ``scores/<split>.csv``; writes the split's report.json, PNGs and report.html.

    The test split's report is ``eval/report.json`` (the contract); any other split's is
    ``eval/split-<split>/report.json``, so it never replaces the test report (:meth:`RunDir.split_report`).

    Args:
        run: Run directory with scores/ and calibration/.
        settings: Resolved settings (unused beyond validation today; kept for a stable signature).
        split: Split whose scores to evaluate (train, val_select, val_calib or test).
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    if split not in ("train", "val_select", "val_calib", "test"):
        raise UsageError(f"Unknown split {split!r}; choose train, val_select, val_calib or test.")
    scores = run.require(run.score_file(split), "train")
    rule = load_run_calibration(run)
    table = read_scores_csv(scores)
    return _evaluate(table, rule, run.split_report(split), run, {"split": split, "scores": str(scores)})


def source_slug(source: str) -> str:
    """A folder name for a data source: its last path part, with anything but [A-Za-z0-9._-] replaced by '-'."""
    name = Path(source.rstrip("/")).name or source
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "source"


def source_report_path(run: RunDir, source: str) -> Path:
    """Where ``evaluate --source`` writes its report: ``eval/source-<slug>/report.json``."""
    return run.eval / f"source-{source_slug(source)}" / "report.json"


def evaluate_source(run: RunDir | str | Path, source: str, settings, progress: bool = False) -> dict[str, Any]:
    """Score any data source with the run's model (``scoring.score_source``) and evaluate those scores.

    Writes ``eval/source-<slug>/report.json`` (with its scores, plots and HTML), beside the test split's report. Inputs
    that could not be read are counted in the report's ``rejected`` block (per reason) and listed with their reasons in
    ``scores.rejected.jsonl`` beside it.

    Args:
        run: Trained and calibrated run directory.
        source: Any ``--source`` that ``roadwork split`` accepts.
        settings: Resolved settings (data section for reading the source, predict section for batching).
        progress: Show a progress bar on stderr while scoring.
    """
    from roadwork_cli.data.pixels import reason_kind
    from roadwork_cli.scoring import score_source

    run = run if isinstance(run, RunDir) else RunDir(run)
    rule = load_run_calibration(run)
    report_path = source_report_path(run, source)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    scores = report_path.parent / "scores.csv"
    score_source(run, source, settings, scores, progress=progress)
    rejected_file = scores.with_suffix(".rejected.jsonl")
    reasons = [json.loads(line)["reason"] for line in rejected_file.read_text().splitlines() if line.strip()]
    by_reason = dict(Counter(map(reason_kind, reasons)))
    rejected = {"count": len(reasons), "by_reason": by_reason, "file": rejected_file.name}
    table = read_scores_csv(scores)
    extra = {"split": None, "source": source, "scores": str(scores), "rejected": rejected}
    return _evaluate(table, rule, report_path, run, extra)


def evaluate_scores(
    scores_csv: str | Path, params_path: str | Path, out: str | Path, scaling_path: str | Path | None = None
) -> dict[str, Any]:
    """Evaluate any scores CSV under a params JSON; writes ``out`` (report.json) and plots/HTML beside it."""
    rule = SelectiveConformal.load(Path(scaling_path) if scaling_path else None, Path(params_path))
    table = read_scores_csv(scores_csv)
    return _evaluate(table, rule, Path(out), None, {"split": None, "scores": str(scores_csv)})
