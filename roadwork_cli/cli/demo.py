"""``roadwork demo``: the whole pipeline on synthetic street scenes, offline."""

from __future__ import annotations

from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, RunOption, handle_errors
from roadwork_cli.errors import NotBuiltError


@handle_errors
def command(
    run: RunOption = None,
    per_class: Annotated[int | None, typer.Option("--per-class", help="Synthetic images per class.")] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Generate scenes, then split, cache, train, calibrate, evaluate, export and predict."""
    raise NotBuiltError("`roadwork demo` is not built yet.")
