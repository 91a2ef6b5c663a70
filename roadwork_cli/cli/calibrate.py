"""``roadwork calibrate``: probability scaling on val_select, SCRC-I thresholds on val_calib."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, RunOption, handle_errors
from roadwork_cli.errors import NotBuiltError


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
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Fit scaling and certified thresholds; exit 3 when the targets cannot be certified."""
    raise NotBuiltError("`roadwork calibrate` is not built yet.")
