"""Rich tables and plain-words summaries of calibration and evaluation, shared by the terminal and the HTML report.

No UI calls a run "certified" or "satisfied" unless calibration certified its targets: ``guarantee_verdict`` is the
one place that words the guarantee.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

NO_GUARANTEE = "no guarantee (targets not certified)"
UNTESTABLE = "FNR on exits not testable on this data"

GLOSSARY: tuple[tuple[str, str], ...] = (
    ("exit / defer", "stage 1 either decides (exits with roadwork or no_roadwork) or defers the image to stage 2."),
    ("coverage", "the fraction of images that exit stage 1; the target xi is its minimum."),
    ("FNR on exits", "missed roadwork among the roadwork images that exit; the target alpha is its maximum."),
    ("FPR on exits", "false alarms among the no_roadwork images that exit."),
    (
        "certified",
        "calibration proved, from the val_calib images, that FNR on exits <= alpha and coverage >= xi hold "
        "with probability at least 1 - delta (SCRC-I); assumes independent images (or groups).",
    ),
    (
        "satisfied (observed)",
        "the rates measured on this data are within the targets; a statement about this data only, not a guarantee.",
    ),
    (
        "CP bound",
        "Clopper-Pearson: an exact binomial confidence bound on a rate from k events in m trials, at level "
        "delta. On test data with fixed thresholds it is a valid bound for that rate.",
    ),
    (
        "pointwise bound",
        "a CP bound at thresholds chosen after looking at the same data; it is not part of the "
        "certificate, which is FNR <= alpha.",
    ),
    (
        "risk-coverage curve",
        "the error on exits when only the images with the highest selection score exit, for every exit rate.",
    ),
    (
        "AURC",
        "area under the risk-coverage curve: the mean error over all exit rates (lower = the score ranks "
        "right decisions first).",
    ),
    (
        "selection score g",
        "the score that orders images for exiting: the calibrated gate head or max(p, 1 - p) (softmax response).",
    ),
    (
        "set size",
        "prediction-set view of stage 1: an exit is a set of one class, a deferral the set {0, 1}; the "
        "average set size is 1 + the deferral rate.",
    ),
    ("ECE", "expected calibration error: the mean gap between predicted p and the observed roadwork rate."),
    ("MCC", "Matthews correlation coefficient of the p >= 0.5 decision on every image."),
)


def format_value(value: Any) -> str:
    """One way to print a number, flag or missing value in every table (4 decimals; '–' for missing)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "–"


def certified_over(record: dict[str, Any]) -> str:
    """The words " over N groups" when a certificate (params or a report's guarantee block) counted groups, else ""."""
    if record.get("unit") == "groups" and record.get("n_groups"):
        return f" over {record['n_groups']} groups"
    return ""


def guarantee_statement(params: dict[str, Any]) -> str | None:
    """What a calibration (``scrc_params.json``) promises, in one line: the certified targets, or no guarantee and
    what stage 1 then does; None when the file records no outcome (no ``feasible`` key)."""
    from roadwork_cli.calibration.estimator import defers_everything, is_certified

    if "feasible" not in params:
        return None
    if is_certified(params):
        targets = params.get("targets") or {}
        return (
            f"certified{certified_over(params)}: FNR on exits <= {targets.get('alpha')} and coverage >= "
            f"{targets.get('xi')} with probability >= {1 - float(targets.get('delta') or 0):.4g}"
        )
    if defers_everything(params):
        return f"{NO_GUARANTEE}: every image is deferred (infeasible calibration)"
    if not params["feasible"]:
        return f"{NO_GUARANTEE}: decisions follow the fallback thresholds of an infeasible calibration"
    return f"{NO_GUARANTEE}: method {params.get('method')} does not certify with probability >= 1 - delta"


def guarantee_verdict(guarantee: dict[str, Any]) -> str:
    """The guarantee in words: no guarantee unless certified, then whether this data's rates meet the targets."""
    if not guarantee.get("certified"):
        return NO_GUARANTEE
    over = certified_over(guarantee)
    if guarantee.get("satisfied") is None:  # no roadwork image exits: FNR on exits is undefined
        return f"certified{over}; {UNTESTABLE} (no roadwork image among the exits)"
    if guarantee.get("satisfied"):
        return f"certified{over}; satisfied on this data"
    return f"certified{over}, but NOT satisfied on this data"


def rule_in_words(thresholds: dict[str, Any], selection_score: str | None = None) -> str:
    """The rule with its thresholds, e.g. "band: no_roadwork iff p < 0.05021, roadwork iff p >= 0.8123, ..."."""
    from roadwork_cli.calibration.rules import rule_from_params

    return rule_from_params({"thresholds": thresholds}).describe(selection_score or "g")


def describe_operating_point(report: dict[str, Any]) -> str:
    """One sentence: what stage 1 does at its operating point on this data, with the rule's thresholds."""
    n = int(report.get("n") or 0)
    counts = report.get("decisions") or {}
    roadwork, no_roadwork, defer = (int(counts.get(k, 0)) for k in ("roadwork", "no_roadwork", "defer"))
    exits = roadwork + no_roadwork
    guarantee = report.get("guarantee") or {}
    calibration = report.get("calibration") or {}
    rule = rule_in_words(report.get("thresholds") or {}, calibration.get("selection_score"))
    if exits == 0 and n and calibration.get("feasible") is False:
        return (f"Stage 1 defers all {n} images to stage 2: calibration did not certify the targets, and an "
                f"uncertified run defers everything (the fitted fallback rule would be {rule}).")  # fmt: skip
    misses, positives = int(guarantee.get("misses") or 0), int(guarantee.get("exited_positives") or 0)
    return (
        f"Stage 1 exits {_percent(exits, n)} of the {n} images ({roadwork} called roadwork, {no_roadwork} "
        f"no_roadwork) and defers {defer} ({_percent(defer, n)}) to stage 2; of the {positives} roadwork images that "
        f"exit it misses {misses} (FNR on exits {format_value(report.get('fnr_on_exits'))}). Rule: {rule}."
    )


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
        ("coverage (exit rate)", report.get("coverage"), f">= {format_value(g.get('xi'))}"),
        ("coverage lower bound (CP, this data)", g.get("coverage_lower"), f">= {format_value(g.get('xi'))}"),
        ("FNR on exits", report.get("fnr_on_exits"), f"<= {format_value(g.get('alpha'))}"),
        ("FNR upper bound (CP, this data)", g.get("fnr_upper"), f"<= {format_value(g.get('alpha'))}"),
        ("FPR on exits", report.get("fpr_on_exits"), None),
        ("accuracy on exits", report.get("accuracy_on_exits"), None),
        ("risk @ coverage target", report.get("risk_at_coverage"), f"coverage {format_value(targets.get('coverage'))}"),
        ("coverage @ risk target", report.get("coverage_at_risk"), f"risk {format_value(targets.get('risk'))}"),
        ("avg set size", report.get("avg_set_size"), None),
        ("AURC (selection score)", report.get("aurc"), None),
        (
            "AURC gate / softmax resp.",
            f"{format_value(report.get('aurc_gate'))} / {format_value(report.get('aurc_softmax_response'))}",
            None,
        ),  # fmt: skip
        (
            "observed rates within targets",
            "not testable" if g and g.get("satisfied") is None else g.get("satisfied"),
            None,
        ),  # fmt: skip
        ("guarantee", guarantee_verdict(g), f"delta {format_value(g.get('delta'))}"),
    ]


def decision_rows(report: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    """(decision, roadwork images, no_roadwork images, share of all) rows of the decision-count table."""
    counts = report.get("decision_counts") or {}
    n = int(report.get("n") or 0)
    rows = []
    for decision in ("roadwork", "no_roadwork", "defer"):
        by_label = counts.get(decision) or {}
        positives, negatives = int(by_label.get("roadwork", 0)), int(by_label.get("no_roadwork", 0))
        rows.append((decision, positives, negatives, _percent(positives + negatives, n)))
    return rows


ROBUSTNESS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("MCC", "mcc"),
    ("AUROC", "auroc"),
    ("NATIX reward", "natix_reward"),
    ("coverage", "coverage"),
    ("FNR on exits", "fnr_on_exits"),
    ("targets held", "satisfied"),
)
"""(header, key) of the per-level robustness table, shared by the terminal and the HTML report."""


def robustness_rows(block: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """``(level, [value per ROBUSTNESS_COLUMNS])`` per ``level_<k>`` of a report's ``robustness`` block, in order."""
    names = sorted(key for key in block if key.startswith("level_"))
    return [(name.removeprefix("level_"), [block[name].get(key) for _, key in ROBUSTNESS_COLUMNS]) for name in names]


def report_table(report: dict[str, Any], title: str = "evaluation") -> Table:
    """Evaluation results with the targets beside them, captioned with the operating point in words."""
    table = Table(title=title, caption=describe_operating_point(report))
    table.add_column("metric")
    table.add_column("result", justify="right")
    table.add_column("target", justify="right")
    for name, value, target in metric_rows(report):
        table.add_row(name, format_value(value), format_value(target) if target is not None else "")
    return table


def calibration_table(params: dict[str, Any], title: str = "calibration") -> Table:
    """Chosen thresholds, what is certified, empirical rates on val_calib, and what is attainable."""
    thresholds = params.get("thresholds", {})
    targets = params.get("targets", {})
    certified = params.get("certified", {})
    empirical = params.get("empirical", {})
    table = Table(title=f"{title} ({params.get('method')}, {'feasible' if params.get('feasible') else 'INFEASIBLE'})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    is_certified = certified.get("targets")
    statement = f"FNR on exits <= {targets.get('alpha')}, coverage >= {targets.get('xi')}"
    confidence = f"probability >= {1 - float(targets.get('delta') or 0):.4g}"
    rows: list[tuple[str, Any, Any]] = [
        ("calibration images n (positives)", f"{params.get('n')} ({params.get('n_pos')})", None),
        ("rule", rule_in_words(thresholds, params.get("gate_score")), None),
    ]
    # Only the thresholds the rule has (the band rule has no lambda, the gate rule no b); no empty rows.
    rows += [(name, value, None) for name, value in (
        ("selection score", params.get("gate_score")),
        ("lambda", thresholds.get("lambda")),
        ("tau", thresholds.get("tau")),
        ("b", thresholds.get("b")),
    ) if value is not None]  # fmt: skip
    if thresholds.get("sets"):
        rows.append(("set thresholds", thresholds["sets"], None))
    rows += [
        ("guarantee", f"certified: {statement}" if is_certified else NO_GUARANTEE, confidence),
        ("FNR upper bound (pointwise CP at the chosen tau)", certified.get("fnr_upper_pointwise"), None),
        ("coverage lower bound (DKW)", certified.get("coverage_lower"), f">= {format_value(targets.get('xi'))}"),
        ("empirical FNR on exits", empirical.get("fnr"), None),
        ("empirical coverage", empirical.get("coverage"), None),
        ("accuracy on exits", empirical.get("accuracy_on_exits"), None),
        ("delta (coverage + risk)", f"{format_value(targets.get('delta1'))} + {format_value(targets.get('delta2'))}",
         None),
    ]  # fmt: skip
    if not params.get("feasible"):
        decides = params.get("infeasible_decisions", "defer")
        rows.append(("decides until re-calibrated", "defers everything" if decides == "defer" else "fallback rule",
                     None))  # fmt: skip
    attainable = params.get("attainable") or {}
    for key, value in attainable.items():
        rows.append((key.replace("_", " "), value, None))
    for name, value, target in rows:
        table.add_row(name, format_value(value), format_value(target) if target is not None else "")
    return table
