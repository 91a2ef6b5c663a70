"""``roadwork cache-features``: run the frozen backbone once per image and keep the features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, RunOption, handle_errors
from roadwork_cli.errors import NotBuiltError


@handle_errors
def command(
    run: RunOption = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="Backbone name (see list_backbones()).")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local backbone weights file.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per forward pass.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="DataLoader workers.")] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Extract backbone features for every split image into DIR/features/<fingerprint>/ (resumable)."""
    raise NotBuiltError("`roadwork cache-features` is not built yet.")
