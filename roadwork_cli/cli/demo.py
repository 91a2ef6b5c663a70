"""``roadwork demo``: the whole pipeline on synthetic street scenes, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    DeviceOption,
    JsonOption,
    RunOption,
    ThreadsOption,
    check_device,
    console,
    handle_errors,
    print_json,
)


@handle_errors
def command(
    run: RunOption = None,
    per_class: Annotated[int | None, typer.Option("--per-class", help="Synthetic images per class.")] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Generate scenes, then split, cache, train, calibrate, evaluate, export and predict."""
    from roadwork_cli.pipeline import demo_settings, run_demo

    settings = demo_settings(config, per_class=per_class, run=run, device=device, threads=threads)
    check_device(settings)  # before the demo splits thousands of images
    if settings.calibration.allow_infeasible and not settings.export.allow_uncertified:
        # Whoever lets calibration pass uncertified wants the demo to finish: export would otherwise refuse the very
        # calibration they allowed (exit 2 after every other stage ran). The bundle then says it has no guarantee.
        export = settings.export.model_copy(update={"allow_uncertified": True})
        settings = settings.model_copy(update={"export": export})
    console.print(
        f"[bold]roadwork demo[/] in {settings.runtime.run}: {settings.data.sources[0]}, backbone "
        f"{settings.model.backbone}, targets FNR <= {settings.calibration.fnr:g} on exits, coverage >= "
        f"{settings.calibration.coverage:g}, delta {settings.calibration.delta:g}"
    )
    summary = run_demo(settings, progress=console.is_terminal, on_stage=_render_stage)
    console.print(
        f"[bold green]demo finished[/] in {summary.seconds:.0f} s. Report: {summary.run.report} and "
        f"{summary.run.eval / 'report.html'}; bundle: {summary.bundle}"
    )
    if not (summary.report.get("guarantee") or {}).get("certified", True):
        console.print(
            "[yellow]The bundle is uncertified:[/] calibration did not certify the targets and "
            f"calibration.allow_infeasible let it pass, so its decisions carry no guarantee (roadwork info "
            f"{summary.bundle} says what it decides).",
            soft_wrap=True,
        )
    console.print(f"next: roadwork predict IMAGE... --bundle {summary.bundle}")
    if json_output:
        print_json(demo_json(summary))


def demo_json(summary: Any) -> dict[str, Any]:
    """The ``--json`` summary: where things are, seconds per stage, the test report and the example predictions."""
    return {
        "run": str(summary.run.root),
        "bundle": summary.bundle,
        "seconds": summary.seconds,
        "stages": {stage.name: stage.seconds for stage in summary.stages},
        "report": summary.report,
        "report_json": summary.run.report,
        "report_html": summary.run.eval / "report.html",
        "predictions": [prediction.to_dict() | {"label": label} for prediction, label in summary.predictions],
    }


def _render_stage(stage: Any) -> None:
    from rich.table import Table

    from roadwork_cli.reporting.tables import calibration_table, report_table

    name, result = stage.name, stage.summary
    title = f"{name} ({stage.seconds:.1f} s)"
    if name == "split":
        table = Table(title=title)
        for column in ("split", "roadwork", "no_roadwork"):
            table.add_column(column, justify="right" if column != "split" else "left")
        per: dict[str, list[int]] = {}
        for split, label, _source, count in result.rows():
            per.setdefault(split, [0, 0])[1 - label] += count
        for split, (pos, neg) in per.items():
            table.add_row(split, str(pos), str(neg))
        table.caption = f"{result.n_samples} images, {result.n_rejected} rejected"
    elif name == "cache-features":
        table = _pairs(
            title,
            [
                ("backbone", f"{result.backbone} ({result.fingerprint})"),
                ("rows computed / reused", f"{result.computed} / {result.reused}"),
                ("throughput", f"{result.images_per_second:,.1f} img/s"),
            ],
        )
    elif name == "train":
        rows = [("epochs run", f"{result.epochs_run} of {result.epochs}"), ("best epoch", str(result.best_epoch))]
        rows += [(f"val_select {k}", f"{v:.4f}") for k, v in result.best_metrics.items()]
        table = _pairs(title, rows)
    elif name == "calibrate":
        table = calibration_table(result.params, title=title)
    elif name == "evaluate":
        table = report_table(result, title=f"evaluate on test ({stage.seconds:.1f} s)")
    elif name == "export":
        table = _pairs(title, [("bundle", str(result)), ("size", f"{result.stat().st_size:,} bytes")])
        table.add_row("model.onnx", _onnx_cell(result))
    else:
        table = Table(title=f"predict from the bundle on held-out test images ({stage.seconds:.1f} s)")
        for column in ("image", "truth", "decision", "p_roadwork", "gate"):
            table.add_column(column, overflow="fold")
        for prediction, label in result:
            table.add_row(
                prediction.path.rsplit("/", 1)[-1],
                "roadwork" if label == 1 else "no_roadwork",
                prediction.decision or f"error: {prediction.error}",
                "-" if prediction.p_roadwork is None else f"{prediction.p_roadwork:.3f}",
                "-" if prediction.gate is None else f"{prediction.gate:.3f}",
            )
    console.print(table)


def _onnx_cell(bundle: Path) -> str:
    """Whether the bundle holds model.onnx, and how it was verified or why it was left out."""
    from rich.markup import escape

    from roadwork_cli.io.bundle import verify_bundle

    record = verify_bundle(bundle).extras.get("onnx") or {}
    if record.get("member"):
        check = record.get("verification") or {}
        return f"verified against PyTorch (max abs diff {check.get('max_abs_diff', float('nan')):.2g})"
    if record.get("skipped"):
        return escape(f"left out, predict runs PyTorch: {record['skipped']}")
    return "not written (export.onnx: false)"


def _pairs(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    return table
