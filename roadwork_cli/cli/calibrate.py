"""``roadwork calibrate``: probability scaling on val_select, SCRC-I thresholds on val_calib."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    JsonOption,
    RunOption,
    console,
    handle_errors,
    print_json,
    require_run,
    resolve_settings,
)


@handle_errors
def command(
    run: RunOption = None,
    scores: Annotated[Path | None, typer.Option("--scores", help="CSV with p_roadwork,gate,label.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write scrc_params.json (with --scores).")] = None,
    fnr: Annotated[float | None, typer.Option("--fnr", help="alpha: max FNR among exits.")] = None,
    coverage: Annotated[float | None, typer.Option("--coverage", help="xi: min fraction of images that exit.")] = None,
    delta: Annotated[float | None, typer.Option("--delta", help="Allowed failure probability.")] = None,
    allow_infeasible: Annotated[
        bool | None, typer.Option("--allow-infeasible", help="Exit 0 even if the targets are not attainable.")
    ] = None,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Fit scaling and certified thresholds; exit 3 when the targets cannot be certified."""
    from roadwork_cli.errors import InfeasibleError, UsageError

    if scores is not None and run is not None:
        raise UsageError("Pass either --run DIR or --scores FILE.csv --out PARAMS.json, not both.")
    if scores is not None and out is None:
        raise UsageError("--scores needs --out PARAMS.json (where to write the thresholds).")
    if scores is None and out is not None:
        raise UsageError("--out only goes with --scores; with --run the params go to DIR/calibration/.")
    flags = {"fnr": fnr, "coverage": coverage, "delta": delta, "allow_infeasible": allow_infeasible}
    overrides = {"runtime": {"run": run}, "calibration": flags}
    settings = resolve_settings(config, overrides, write_to_run=scores is None)
    from roadwork_cli.calibration.api import calibrate_run, calibrate_scores, infeasible_message
    from roadwork_cli.reporting.tables import calibration_table

    try:
        if scores is not None:
            result = calibrate_scores(scores, out, settings.calibration)
        else:
            from roadwork_cli.io.run import RunDir

            result = calibrate_run(RunDir(require_run(settings)), settings.calibration)
    except InfeasibleError as exc:
        result = getattr(exc, "result", None)
        if result is not None:
            console.print(calibration_table(result.params, title="calibration: targets NOT attainable"))
        raise
    console.print(calibration_table(result.params))
    if not result.feasible:
        message = infeasible_message(result, settings.calibration)
        console.print(f"[yellow]warning: no guarantee (targets not certified).[/] {message} (written anyway: "
                      "--allow-infeasible)")  # fmt: skip
    console.print(f"wrote {result.params_path}")
    if json_output:
        print_json(result.params | {"params_path": result.params_path, "scaling_path": result.scaling_path})
