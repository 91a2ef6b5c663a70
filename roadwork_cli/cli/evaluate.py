"""``roadwork evaluate``: selective metrics, the guarantee check, plots and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, RunOption, handle_errors
from roadwork_cli.errors import NotBuiltError


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
    raise NotBuiltError("`roadwork evaluate` is not built yet.")
