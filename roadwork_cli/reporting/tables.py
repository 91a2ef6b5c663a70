"""Rich tables for the terminal: calibration choices and evaluation results beside their targets."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metric_rows(report: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, result, target) rows shared by the rich table and the HTML report."""
    g = report.get("guarantee", {})
    targets = report.get("selective_targets", {})
    return [
        ("images", report.get("n"), None),
        ("accuracy (all, p >= 0.5)", report.get("accuracy"), None),
        ("MCC (all, p >= 0.5)", report.get("mcc"), None),
        ("AUROC", report.get("auroc"), None),
        ("ECE", report.get("ece"), None),
        ("coverage (exit rate)", report.get("coverage"), f">= {_fmt(g.get('xi'))}"),
        ("coverage lower bound (CP)", g.get("coverage_lower"), f">= {_fmt(g.get('xi'))}"),
        ("FNR on exits", report.get("fnr_on_exits"), f"<= {_fmt(g.get('alpha'))}"),
        ("FNR upper bound (CP)", g.get("fnr_upper"), f"<= {_fmt(g.get('alpha'))}"),
        ("FPR on exits", report.get("fpr_on_exits"), None),
        ("accuracy on exits", report.get("accuracy_on_exits"), None),
        ("risk @ coverage target", report.get("risk_at_coverage"), f"coverage {_fmt(targets.get('coverage'))}"),
        ("coverage @ risk target", report.get("coverage_at_risk"), f"risk {_fmt(targets.get('risk'))}"),
        ("avg set size", report.get("avg_set_size"), None),
        ("AURC (selection score)", report.get("aurc"), None),
        (
            "AURC gate / softmax resp.",
            f"{_fmt(report.get('aurc_gate'))} / {_fmt(report.get('aurc_softmax_response'))}",
            None,
        ),  # fmt: skip
        ("guarantee satisfied", g.get("satisfied"), f"delta {_fmt(g.get('delta'))}"),
    ]


def report_table(report: dict[str, Any], title: str = "evaluation") -> Table:
    """Evaluation results with the targets beside them."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("result", justify="right")
    table.add_column("target", justify="right")
    for name, value, target in metric_rows(report):
        table.add_row(name, _fmt(value), _fmt(target) if target is not None else "")
    return table


def calibration_table(params: dict[str, Any], title: str = "calibration") -> Table:
    """Chosen (lambda, tau), certified bounds, empirical rates on val_calib, and what is attainable."""
    thresholds = params.get("thresholds", {})
    targets = params.get("targets", {})
    certified = params.get("certified", {})
    empirical = params.get("empirical", {})
    table = Table(title=f"{title} ({params.get('method')}, {'feasible' if params.get('feasible') else 'INFEASIBLE'})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows: list[tuple[str, Any, Any]] = [
        ("calibration images n (positives)", f"{params.get('n')} ({params.get('n_pos')})", None),
    ]
    if thresholds.get("rule") == "band":
        rows += [
            ("rule", "band: defer iff tau <= p < b", None),
            ("tau (no_roadwork iff p < tau)", thresholds.get("tau"), None),
            ("b (roadwork iff p >= b)", thresholds.get("b"), None),
        ]
    else:
        rows += [
            ("selection score", params.get("gate_score"), None),
            ("lambda (exit iff g >= lambda)", thresholds.get("lambda"), None),
            ("tau (roadwork iff p >= tau)", thresholds.get("tau"), None),
        ]
    if thresholds.get("sets"):
        rows.append(("set thresholds", thresholds["sets"], None))
    rows += [
        ("certified FNR upper bound", certified.get("fnr_upper"), f"<= {_fmt(targets.get('alpha'))}"),
        ("certified coverage lower bound", certified.get("coverage_lower"), f">= {_fmt(targets.get('xi'))}"),
        ("empirical FNR on exits", empirical.get("fnr"), None),
        ("empirical coverage", empirical.get("coverage"), None),
        ("accuracy on exits", empirical.get("accuracy_on_exits"), None),
        ("delta (coverage + risk)", f"{_fmt(targets.get('delta1'))} + {_fmt(targets.get('delta2'))}", None),
    ]
    attainable = params.get("attainable") or {}
    for key, value in attainable.items():
        rows.append((key.replace("_", " "), value, None))
    for name, value, target in rows:
        table.add_row(name, _fmt(value), _fmt(target) if target is not None else "")
    return table
