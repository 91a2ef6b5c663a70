"""``roadwork cache-features``: run the frozen backbone once per image and keep the features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    DeviceOption,
    JsonOption,
    RunOption,
    ThreadsOption,
    check_device,
    complete_backbone,
    console,
    handle_errors,
    join_job,
    print_json,
    require_run,
    resolve_settings,
    runtime_overrides,
    setting_default,
)


@handle_errors
def command(
    run: RunOption = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone",
            help="Backbone name; `roadwork backbones` lists them (also timm:<name>, hf:<repo id or local dir>).",
            show_default=setting_default("model.backbone", "efficientnet_lite0"),
            autocompletion=complete_backbone,
        ),
    ] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local backbone weights file.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per forward pass.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="DataLoader workers beside a GPU forward (on the CPU, features.streams decode and run the forward).",
            show_default=setting_default("features.workers", "2"),
        ),
    ] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Extract backbone features for every split image into DIR/features/<fingerprint>/ (resumable)."""
    from rich.table import Table

    settings = resolve_settings(
        config,
        {
            "runtime": runtime_overrides(run, device, threads) | {"debug": debug or None},
            "model": {"backbone": backbone, "weights": weights},
            "features": {"batch_size": batch_size, "workers": workers},
        },
        switches_backbone=True,
    )
    check_device(settings)
    from roadwork_cli.features.cache import cache_features
    from roadwork_cli.io.run import RunDir

    dist = join_job("cache-features", settings)
    summary = cache_features(RunDir(require_run(settings)), settings, progress=dist.is_main, dist=dist)
    if not dist.is_main:  # rank 0 reports for the job
        return
    table = Table(title="cache-features", show_header=False)
    table.add_row("backbone", summary.backbone)
    table.add_row("fingerprint", summary.fingerprint)
    table.add_row("feature dim", str(summary.feature_dim))
    table.add_row("rows (images x views)", str(summary.total))
    table.add_row("computed / reused", f"{summary.computed} / {summary.reused}")
    table.add_row("unreadable (skipped)", f"{summary.failed}" + (" -> failed.json" if summary.failed else ""))
    table.add_row("throughput", f"{summary.images_per_second:,.1f} img/s ({summary.seconds:.1f} s)")
    table.add_row("folder", str(summary.folder))
    table.add_row("processes", dist.describe())
    console.print(table)
    if json_output:
        print_json(summary)
