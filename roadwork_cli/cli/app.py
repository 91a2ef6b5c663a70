"""The ``roadwork`` console command: one thin subcommand per pipeline stage.

Nothing here imports torch, timm or transformers at module level, so ``roadwork --help`` starts fast.
"""

from __future__ import annotations

import typer

from roadwork_cli import __version__
from roadwork_cli.cli import (
    backbones,
    cache_features,
    calibrate,
    demo,
    evaluate,
    export,
    info,
    predict,
    serve,
    split,
    train,
)
from roadwork_cli.cli.common import RoadworkCommand, RoadworkGroup

app = typer.Typer(
    name="roadwork",
    cls=RoadworkGroup,
    help="Stage 1 of a two-stage roadwork detector: split, cache features, train, calibrate (SCRC-I), evaluate, "
    "export, predict.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"roadwork {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Stage 1 of a two-stage roadwork detector."""


for _name, _module in (
    ("split", split),
    ("cache-features", cache_features),
    ("train", train),
    ("calibrate", calibrate),
    ("evaluate", evaluate),
    ("export", export),
    ("predict", predict),
    ("serve", serve),
    ("demo", demo),
    ("info", info),
    ("backbones", backbones),
):
    app.command(_name, cls=RoadworkCommand)(_module.command)


def main() -> None:
    """Console-script entry point."""
    app()
