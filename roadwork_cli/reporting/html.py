"""A self-contained HTML report: the metrics beside their targets, with every plot embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from roadwork_cli.io.atomic import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f4f4f4; text-align: left; } .ok { color: #137333; font-weight: bold; }
.bad { color: #b3261e; font-weight: bold; } img { max-width: 100%; margin: 0.5em 0; }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _image(path: Path, title: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def render_report_html(report: dict[str, Any], images: dict[str, Path]) -> str:
    """The HTML text of the report (no external resources)."""
    from roadwork_cli.reporting.tables import metric_rows

    guarantee = report.get("guarantee", {})
    verdict = guarantee.get("satisfied")
    badge = '<span class="ok">satisfied</span>' if verdict else '<span class="bad">NOT satisfied</span>'
    rows = "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{_fmt(value)}</td><td>{_fmt(target)}</td></tr>"
        for name, value, target in metric_rows(report)
    )
    titles = {
        "risk_coverage": "Risk-coverage curve",
        "reliability": "Reliability diagram",
        "histograms": "Score histograms per class",
        "examples": "Examples: missed roadwork, false alarms, deferred",
    }
    figures = "\n".join(_image(path, titles.get(name, name)) for name, path in images.items() if name in titles)
    raw = html.escape(json.dumps(report, indent=2, sort_keys=True, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>roadwork evaluation</title><style>{_STYLE}</style></head>
<body>
<h1>roadwork stage-1 evaluation</h1>
<p>{report.get("n")} images{" from " + html.escape(str(report["split"])) if report.get("split") else ""}.
Guarantee (FNR on exits &le; {_fmt(guarantee.get("alpha"))}, coverage &ge; {_fmt(guarantee.get("xi"))}): {badge}</p>
<table><tr><th>metric</th><th>result</th><th>target</th></tr>
{rows}
</table>
{figures}
<details><summary>report.json</summary><pre>{raw}</pre></details>
</body></html>
"""


def write_report_html(path: Path, report: dict[str, Any], images: dict[str, Path]) -> Path:
    """Write ``render_report_html`` atomically to ``path``."""
    atomic_write_text(path, render_report_html(report, images))
    return Path(path)
