"""``roadwork evaluate``: selective metrics, the guarantee check, plots and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    RunOption,
    console,
    handle_errors,
    require_run,
    resolve_settings,
)


@handle_errors
def command(
    run: RunOption = None,
    split: Annotated[str | None, typer.Option("--split", help="Split of the run to evaluate (default test).")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Evaluate on another data source instead.")] = None,
    scores: Annotated[Path | None, typer.Option("--scores", help="CSV with p_roadwork,gate,label.")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="scrc_params.json (with --scores).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write report.json (with --scores).")] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Evaluate calibrated stage 1 and write eval/report.json, plots and report.html."""
    from roadwork_cli.errors import UsageError

    if scores is not None:
        if run is not None or source is not None or split is not None:
            raise UsageError("--scores goes with --params and --out only (not --run, --split or --source).")
        if params is None or out is None:
            raise UsageError("--scores needs --params PARAMS.json and --out REPORT.json.")
    elif params is not None or out is not None:
        raise UsageError("--params/--out only go with --scores; with --run the report goes to DIR/eval/.")
    elif split is not None and source is not None:
        raise UsageError("Pass --split or --source, not both.")
    settings = resolve_settings(config, {"runtime": {"run": run}}, write_to_run=scores is None)
    from roadwork_cli.reporting import evaluate as evaluation
    from roadwork_cli.reporting.tables import report_table

    if scores is not None:
        report = evaluation.evaluate_scores(scores, params, out)
        written = out
    else:
        from roadwork_cli.io.run import RunDir

        run_dir = RunDir(require_run(settings))
        if source is not None:
            report = evaluation.evaluate_source(run_dir, source, settings)
        else:
            report = evaluation.evaluate_run(run_dir, settings, split=split or "test")
        written = run_dir.report
    console.print(report_table(report, title=f"evaluation ({report.get('split') or report.get('source') or scores})"))
    console.print(f"wrote {written} (plots and report.html beside it)")
