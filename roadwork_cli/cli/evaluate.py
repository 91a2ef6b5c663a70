"""``roadwork evaluate``: selective metrics, the guarantee check, plots and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    DeviceOption,
    JsonOption,
    RunOption,
    ThreadsOption,
    apply_threads,
    check_device,
    console,
    handle_errors,
    print_json,
    require_run,
    resolve_settings,
    runtime_overrides,
)


@handle_errors
def command(
    run: RunOption = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Split of the run to evaluate (default test; others go to eval/split-NAME/)."),
    ] = None,
    source: Annotated[str | None, typer.Option("--source", help="Evaluate on another data source instead.")] = None,
    scores: Annotated[Path | None, typer.Option("--scores", help="CSV with p_roadwork,gate,label.")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="scrc_params.json (with --scores).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write report.json (with --scores).")] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit 1 unless calibration certified the targets and the observed rates meet them on this data.",
        ),
    ] = False,
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="Also score the split once per NATIX challenge level 0-3 (seeded) and report each level's metrics, "
            "NATIX reward and whether the targets held (the guarantee is only promised for clean data).",
        ),
    ] = False,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Evaluate calibrated stage 1 and write eval/report.json, plots and report.html (eval/split-NAME/ for --split).

    With --strict, exit 1 when the guarantee was not certified by calibration or not met on this data.
    """
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
    if robustness and (scores is not None or source is not None):
        raise UsageError("--robustness re-scores the run's own images (--run [--split]), not --scores or --source.")
    runtime = runtime_overrides(run, device, threads)
    settings = resolve_settings(config, {"runtime": runtime}, write_to_run=scores is None)
    if scores is None:  # --scores computes nothing on a device
        check_device(settings)
    apply_threads(settings)
    from roadwork_cli.reporting import evaluate as evaluation
    from roadwork_cli.reporting.tables import report_table

    if scores is not None:
        report = evaluation.evaluate_scores(scores, params, out)
        written = out
    else:
        from roadwork_cli.io.run import RunDir

        run_dir = RunDir(require_run(settings))
        if source is not None:
            report = evaluation.evaluate_source(run_dir, source, settings, progress=True)
            written = evaluation.source_report_path(run_dir, source)
        else:
            report = evaluation.evaluate_run(run_dir, settings, split=split or "test")
            written = run_dir.split_report(split or "test")
            if robustness:
                from roadwork_cli.robustness import evaluate_robustness

                report = evaluate_robustness(run_dir, settings, split=split or "test", progress=True)
    console.print(report_table(report, title=f"evaluation ({report.get('split') or report.get('source') or scores})"))
    console.print(f"guarantee: {report['guarantee']['verdict']}")
    rejected = report.get("rejected") or {}
    if rejected.get("count"):
        reasons = ", ".join(f"{kind} {n}" for kind, n in rejected["by_reason"].items())
        console.print(
            f"[yellow]{rejected['count']} input(s) could not be read and are not in this report ({reasons}); "
            f"each with its reason in {Path(written).parent / rejected['file']}[/yellow]"
        )
    if "robustness" in report:
        from roadwork_cli.robustness import robustness_table

        console.print(robustness_table(report["robustness"]))
    console.print(f"wrote {written} (plots and report.html beside it)")
    if json_output:
        print_json(report | {"report_path": written})
    if strict:
        evaluation.check_strict(report)
