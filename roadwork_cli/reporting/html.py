"""A self-contained HTML report: the operating point in words, the guarantee as certified, decision counts, metrics
beside their targets, a glossary, and every plot embedded as base64 PNG with a caption.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from roadwork_cli.io.atomic import atomic_write_text
from roadwork_cli.reporting.tables import (
    GLOSSARY,
    NO_GUARANTEE,
    ROBUSTNESS_COLUMNS,
    decision_rows,
    describe_operating_point,
    format_value,
    guarantee_verdict,
    metric_rows,
    robustness_rows,
    rule_in_words,
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f4f4f4; text-align: left; } .ok { color: #137333; font-weight: bold; }
.bad { color: #b3261e; font-weight: bold; } .none { color: #8a5300; font-weight: bold; }
img { max-width: 100%; margin: 0.5em 0; } figcaption { color: #555; font-size: 0.9em; max-width: 60em; }
dt { font-weight: bold; } dd { margin: 0 0 0.4em 1.5em; }
"""

_FIGURES = {
    "risk_coverage": (
        "Risk-coverage curves",
        "Error on exits if only the images with the highest score exited, for every exit rate: solid blue = the "
        "selection score stage 1 uses, dashed orange = max(p, 1 - p). A lower curve ranks right decisions first "
        "(smaller AURC). The red star is stage 1's actual operating point (its exit rate and error on exits under "
        "the calibrated rule); it sits off the curves when the rule does not exit a top-k set of one score, as with "
        "the band rule. The grey dashed line is the coverage target.",
    ),
    "reliability": (
        "Reliability diagram",
        "Observed roadwork rate per bin of calibrated p; on the diagonal, p means what it says.",
    ),
    "histograms": (
        "Score histograms per class",
        "Calibrated p and the selection score per true class, with the rule's thresholds marked.",
    ),
    "examples": (
        "Examples: missed roadwork, false alarms, deferred",
        "The most confident mistakes and the least confident deferrals; p and g to 4 significant digits.",
    ),
    "robustness": (
        "Robustness: metrics per NATIX challenge level",
        "The split scored once per NATIX validator challenge level (0: square centre crop; 1: + rotation up to 20 "
        "degrees, random resized crop of 20-100 % of the area, horizontal and vertical flips; 2: + saturation, "
        "contrast and JPEG degradation; 3: + Gaussian noise and blur), each view seeded per image and level. Filled "
        "markers on coverage and FNR: the targets held on that level. The guarantee is only promised for the "
        "calibration distribution (clean images like val_calib); on challenge levels it is measured, not promised.",
    ),
}


def _fmt(value: Any) -> str:
    return html.escape(format_value(value))


def _figure(path: Path, name: str) -> str:
    title, caption = _FIGURES[name]
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    image = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
    return f"<figure><h2>{html.escape(title)}</h2>\n{image}\n<figcaption>{html.escape(caption)}</figcaption></figure>"


def _badge(guarantee: dict[str, Any]) -> str:
    verdict = guarantee_verdict(guarantee)
    # Green only for a certified run whose targets held here; "not testable" (satisfied null) is never green.
    satisfied = guarantee.get("satisfied")
    css = "none" if verdict == NO_GUARANTEE or satisfied is None else ("ok" if satisfied else "bad")
    return f'<span class="{css}">{html.escape(verdict.capitalize())}</span>'


def _headline(report: dict[str, Any]) -> str:
    guarantee = report.get("guarantee", {})
    where = f" from {html.escape(str(report.get('split') or report.get('source')))}" if (
        report.get("split") or report.get("source")) else ""  # fmt: skip
    targets = (f"FNR on exits &le; {_fmt(guarantee.get('alpha'))} and coverage &ge; {_fmt(guarantee.get('xi'))} "
               f"with probability &ge; 1 &minus; {_fmt(guarantee.get('delta'))}")  # fmt: skip
    return (
        f'<p class="headline">{html.escape(describe_operating_point(report))}</p>\n'
        f"<p>{report.get('n')} images{where}. Guarantee ({targets}): {_badge(guarantee)}</p>"
    )


def _calibration_table(report: dict[str, Any]) -> str:
    calibration = report.get("calibration", {})
    thresholds = report.get("thresholds", {})
    rows = [
        ("rule", rule_in_words(thresholds, calibration.get("selection_score"))),
        ("lambda / tau / b", " / ".join(format_value(thresholds.get(k)) for k in ("lambda", "tau", "b"))),
        ("method", calibration.get("method")),
        ("calibration feasible", calibration.get("feasible")),
        ("guarantee", guarantee_verdict(report.get("guarantee", {}))),
        ("FNR upper bound at the chosen tau (pointwise CP, val_calib)", calibration.get("fnr_upper_pointwise")),
        ("coverage lower bound (DKW, val_calib)", calibration.get("certified_coverage_lower")),
    ]
    body = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<h2>Thresholds and calibration</h2>\n<table>{body}</table>"


def _decision_table(report: dict[str, Any]) -> str:
    body = "\n".join(
        f"<tr><td>{html.escape(d)}</td><td>{pos}</td><td>{neg}</td><td>{pos + neg}</td><td>{share}</td></tr>"
        for d, pos, neg, share in decision_rows(report)
    )
    return ("<h2>Decisions</h2>\n<table><tr><th>decision</th><th>true roadwork</th><th>true no_roadwork</th>"
            f"<th>images</th><th>share</th></tr>\n{body}</table>")  # fmt: skip


def _robustness_table(report: dict[str, Any]) -> str:
    block = report.get("robustness")
    if not isinstance(block, dict):
        return ""
    header = "".join(f"<th>{html.escape(name)}</th>" for name, _ in ROBUSTNESS_COLUMNS)
    body = "\n".join(
        f"<tr><td>{html.escape(level)}</td>" + "".join(f"<td>{_fmt(value)}</td>" for value in values) + "</tr>"
        for level, values in robustness_rows(block)
    )
    note = f"<p>{html.escape(str(block.get('note', '')))}</p>" if block.get("note") else ""
    table = f"<table><tr><th>level</th>{header}</tr>\n{body}</table>"
    return f"<h2>Robustness (NATIX challenge levels)</h2>\n{note}\n{table}"


def render_report_html(report: dict[str, Any], images: dict[str, Path]) -> str:
    """The HTML text of the report (no external resources)."""
    metrics = "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{_fmt(value)}</td><td>{_fmt(target)}</td></tr>"
        for name, value, target in metric_rows(report)
    )
    glossary = "\n".join(f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in GLOSSARY)
    # In _FIGURES order, so a report rendered again from report.json (whose keys are sorted) keeps its layout.
    figures = "\n".join(_figure(images[name], name) for name in _FIGURES if name in images)
    raw = html.escape(json.dumps(report, indent=2, sort_keys=True, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>roadwork evaluation</title><style>{_STYLE}</style></head>
<body>
<h1>roadwork stage-1 evaluation</h1>
{_headline(report)}
{_decision_table(report)}
{_calibration_table(report)}
<h2>Metrics</h2>
<table><tr><th>metric</th><th>result</th><th>target</th></tr>
{metrics}
</table>
{_robustness_table(report)}
{figures}
<h2>Glossary</h2>
<dl>
{glossary}
</dl>
<details><summary>report.json</summary><pre>{raw}</pre></details>
</body></html>
"""


def write_report_html(path: Path, report: dict[str, Any], images: dict[str, Path]) -> Path:
    """Write ``render_report_html`` atomically to ``path``."""
    atomic_write_text(path, render_report_html(report, images))
    return Path(path)
