"""``roadwork split``: read sources, validate and hash images, write leakage-free splits."""

from __future__ import annotations

from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, RunOption, handle_errors
from roadwork_cli.errors import NotBuiltError


@handle_errors
def command(
    source: Annotated[list[str] | None, typer.Option("--source", help="Data source (repeatable).")] = None,
    run: RunOption = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Split seed.")] = None,
    fractions: Annotated[
        str | None, typer.Option("--fractions", help="train,val_select,val_calib,test fractions, e.g. 0.7,0.1,0.1,0.1.")
    ] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Read sources, reject unusable images with a reason, and write DIR/splits.json."""
    raise NotBuiltError("`roadwork split` is not built yet.")
