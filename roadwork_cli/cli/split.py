"""``roadwork split``: read sources, validate and hash images, write leakage-free splits."""

from __future__ import annotations

from typing import Annotated

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    JsonOption,
    RunOption,
    console,
    handle_errors,
    print_json,
    require_run,
    setting_default,
)
from roadwork_cli.errors import UsageError


def parse_fractions(text: str | None) -> tuple[float, float, float, float] | None:
    """``"0.7,0.1,0.1,0.1"`` -> a 4-tuple of floats (settings validation checks the sum)."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--fractions expects four comma-separated numbers, got {text!r}") from None
    if len(values) != 4:
        raise UsageError(f"--fractions expects four numbers (train,val_select,val_calib,test), got {text!r}")
    return values  # type: ignore[return-value]


def _positives_needed(calibration) -> int | None:
    """Fewest exited roadwork images that can certify the FNR target at the configured alpha, delta and grid.

    None for the methods that bound the risk in expectation (crc, sets): they have no such floor.
    """
    from roadwork_cli.calibration.stats import positives_needed

    if calibration.method != "scrc":
        return None
    return positives_needed(calibration.fnr, calibration.delta, calibration.delta_coverage_share, calibration.grid_size)


def _near_duplicate_line(report: dict, group_by: str) -> str:
    """One line on near-duplicate clusters: how many, inside which splits, across splits, and whether grouped."""
    if not report:
        return ""
    head = (
        f"near-duplicates (perceptual hash within {report['threshold_bits']} bits, thumbnails within "
        f"{report['max_difference']:g} levels): "
    )
    if not report["clusters"]:
        return head + "none"
    inside = ", ".join(
        f"{name} {c['clusters']} ({c['images']} img)" for name, c in report["per_split"].items() if c["clusters"]
    )
    grouped = "grouped" if group_by in ("near_duplicates", "auto") else "not grouped"
    return (
        head + f"{report['clusters']} clusters, {report['images']} images, largest {report['largest']}; "
        f"within splits: {inside or 'none'}; across splits: {report['across_splits']}; {grouped} (group_by {group_by})"
    )


@handle_errors
def command(
    source: Annotated[list[str] | None, typer.Option("--source", help="Data source (repeatable).")] = None,
    run: RunOption = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Split seed.", show_default=setting_default("data.seed", "0"))
    ] = None,
    fractions: Annotated[
        str | None,
        typer.Option(
            "--fractions",
            help="train,val_select,val_calib,test fractions.",
            show_default=setting_default("data.fractions", "0.7,0.1,0.1,0.1"),
        ),
    ] = None,
    stratify: Annotated[
        bool | None,
        typer.Option(
            "--stratify/--no-stratify",
            help="Balance each label exactly over the splits (small sets); adding images later may move earlier ones.",
        ),
    ] = None,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Read sources, reject unusable images with a reason, and write DIR/splits.json."""
    from rich.table import Table

    from roadwork_cli.cli.common import resolve_settings
    from roadwork_cli.data.splits import SPLIT_NAMES, build_splits
    from roadwork_cli.io.run import RunDir

    overrides = {
        "runtime": {"run": run, "debug": debug or None},
        "data": {
            "sources": list(source) if source else None,
            "seed": seed,
            "fractions": parse_fractions(fractions),
            "stratify": stratify,
        },
    }
    settings = resolve_settings(config, overrides)
    if not settings.data.sources:
        raise UsageError("no data source: pass --source SRC (folder, .csv/.jsonl, .parquet, COCO .json, synthetic:N).")
    run_dir = RunDir(require_run(settings))
    summary = build_splits(settings.data.sources, settings.data, run_dir, progress=True)

    table = Table(title=f"splits (seed {settings.data.seed})", title_justify="left")
    table.add_column("split")
    table.add_column("label")
    table.add_column("source", overflow="fold")
    table.add_column("images", justify="right")
    for split, label, src, count in summary.rows():
        table.add_row(split, "roadwork" if label == 1 else "no_roadwork", src, str(count))
    totals = summary.split_totals()
    table.add_section()
    table.add_row("total", "", "", str(summary.n_samples))
    table.add_row("rejected", "", str(summary.rejected_path), str(summary.n_rejected))
    console.print(table)
    console.print(
        " · ".join(f"{name} {totals[name]}" for name in SPLIT_NAMES)
        + f"  |  {summary.n_duplicates} duplicates folded, {summary.n_rejected} rejected"
        + (
            f" ({', '.join(f'{k}: {v}' for k, v in sorted(summary.rejected_reasons.items()))})"
            if summary.n_rejected
            else ""
        )
    )
    near = _near_duplicate_line(summary.near_duplicates, settings.data.group_by)
    if near:
        console.print(near, soft_wrap=True)
    console.print(
        f"wrote {summary.splits_path} and {summary.rejected_path} "
        f"({summary.n_inputs} inputs in {summary.seconds:.1f} s, {summary.images_per_second:.0f} img/s)"
    )
    warnings = summary.warnings(positives_needed=_positives_needed(settings.calibration))
    for warning in warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    if json_output:
        rows = [{"split": s, "label": lab, "source": src, "images": n} for s, lab, src, n in summary.rows()]
        print_json(
            {"splits": totals, "rows": rows, "rejected_reasons": summary.rejected_reasons}
            | {k: getattr(summary, k) for k in ("n_inputs", "n_samples", "n_rejected", "n_duplicates", "seconds")}
            | {"splits_path": summary.splits_path, "rejected_path": summary.rejected_path, "warnings": warnings}
            | {"near_duplicates": summary.near_duplicates}
        )
