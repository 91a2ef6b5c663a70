"""``roadwork train``: fit the stage-1 head on cached features (train_cached, train_crc) or head + adapters (train)."""

from __future__ import annotations

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
    complete_setting_choices,
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
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="train_cached (head on cached features) | train (head + adapters on images) | train_crc "
            "(experimental: train_cached plus a conformal-training term; measured no gain over train_cached).",
            show_default=setting_default("train.mode", "train_cached"),
            autocompletion=complete_setting_choices("train.mode"),
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", help="Training epochs.", show_default=setting_default("train.epochs", "30")),
    ] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Train stage 1 and write checkpoints/, metrics.csv and per-split scores."""
    from rich.table import Table

    settings = resolve_settings(
        config,
        {
            "runtime": runtime_overrides(run, device, threads) | {"debug": debug or None},
            "train": {"mode": mode, "epochs": epochs},
        },
    )
    check_device(settings)
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.training.api import train

    dist = join_job("train", settings)  # DDP when launched by torchrun
    summary = train(RunDir(require_run(settings)), settings, progress=dist.is_main)
    if not dist.is_main:  # rank 0 reports for the job
        return
    table = Table(title=f"train ({summary.mode})", show_header=False)
    table.add_row("training images", str(summary.n_train))
    resumed = f" (resumed after epoch {summary.resumed_from})" if summary.resumed_from else ""
    table.add_row("epochs", f"{summary.epochs}{resumed}")
    table.add_row("best epoch", f"{summary.best_epoch} by val_select {summary.select_metric}")
    for name in ("accuracy", "mcc", "auroc", "aurc", "coverage"):
        value = summary.best_metrics.get(name, float("nan"))
        table.add_row(f"val_select {name}", f"{value:.4f}")
    table.add_row("features", f"{summary.backbone} ({summary.fingerprint})")
    table.add_row("scores", ", ".join(str(p) for p in summary.scores.values()))
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("processes", dist.describe())
    console.print(table)
    for note in summary.notes:  # why a metric is undefined, images left out, settings this mode does not use
        console.print(f"[yellow]note:[/] {note}")
    if json_output:
        print_json(summary)
