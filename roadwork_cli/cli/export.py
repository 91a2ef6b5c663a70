"""``roadwork export``: one verified, self-describing bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, RunOption, handle_errors
from roadwork_cli.errors import NotBuiltError


@handle_errors
def command(
    run: RunOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="Bundle path (default DIR/bundle.tar).")] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Pack model, calibration and provenance into bundle.tar."""
    raise NotBuiltError("`roadwork export` is not built yet.")
