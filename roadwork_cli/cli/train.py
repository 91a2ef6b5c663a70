"""``roadwork train``: fit the stage-1 head (train_cached) or head + adapters (train, train_crc)."""

from __future__ import annotations

from typing import Annotated

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, RunOption, handle_errors
from roadwork_cli.errors import NotBuiltError


@handle_errors
def command(
    run: RunOption = None,
    mode: Annotated[str | None, typer.Option("--mode", help="train_cached | train | train_crc.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs.")] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Train stage 1 and write checkpoints/, metrics.csv and per-split scores."""
    raise NotBuiltError("`roadwork train` is not built yet.")
