"""``roadwork predict``: images in, roadwork / no_roadwork / defer out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, handle_errors
from roadwork_cli.errors import NotBuiltError


@handle_errors
def command(
    inputs: Annotated[list[str], typer.Argument(help="Files, folders, globs, or - for paths on stdin.")],
    bundle: Annotated[Path, typer.Option("--bundle", help="bundle.tar from `roadwork export`.")],
    format: Annotated[str | None, typer.Option("--format", help="table | jsonl | csv.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write records here instead of stdout.")] = None,
    probability_only: Annotated[
        bool, typer.Option("--probability-only", help="Print only p_roadwork per input.")
    ] = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Run stage 1 on images and write one record per input."""
    raise NotBuiltError("`roadwork predict` is not built yet.")
