"""``roadwork predict``: images in, roadwork / no_roadwork / defer out.

Every input gets exactly one record, good or bad; the command exits 1 when any input failed. Input expansion and
record formats live in :mod:`roadwork_cli.io.inputs`, the model in :mod:`roadwork_cli.stage1`.
"""

from __future__ import annotations

import io
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, console, handle_errors
from roadwork_cli.io.inputs import FIELDS, FORMATS, expand_inputs, records_to_text, round_score


def records_table(records: list[dict[str, Any]]):
    """A rich table of records (for terminals)."""
    from rich.table import Table

    table = Table(title="stage 1 predictions", show_lines=False)
    for name, justify in zip(FIELDS, ("left", "right", "right", "left", "left"), strict=True):
        table.add_column(name, justify=justify, overflow="fold")
    styles = {"roadwork": "bold red", "no_roadwork": "green", "defer": "yellow"}
    for r in records:
        decision = r["decision"] or "-"
        table.add_row(
            r["path"],
            "-" if r["p_roadwork"] is None else f"{r['p_roadwork']:.4f}",
            "-" if r["gate"] is None else f"{r['gate']:.4f}",
            f"[{styles.get(decision, 'dim')}]{decision}[/]",
            r["error"] or "",
        )
    return table


def choose_format(requested: str | None, setting: str, out: Path | None, is_tty: bool) -> str:
    """``table`` on a terminal, ``jsonl`` otherwise; with ``--out`` the file suffix decides (``.csv`` -> csv)."""
    fmt = requested or setting
    if fmt not in (*FORMATS, "auto"):
        from roadwork_cli.errors import UsageError

        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r}).")
    if fmt != "auto":
        return fmt
    if out is not None:
        return "csv" if out.suffix.lower() == ".csv" else "jsonl"
    return "table" if is_tty else "jsonl"


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
    from roadwork_cli.cli.common import resolve_settings

    # Only flags that were given override lower layers (a nested None would be validated as a value).
    overrides = {"predict": {"format": format}} if format is not None else {}
    settings = resolve_settings(config, overrides, write_to_run=False)
    stdout_tty = sys.stdout.isatty()
    fmt = choose_format(format, settings.predict.format, out, stdout_tty)
    expanded = expand_inputs(inputs)

    started = time.perf_counter()
    from roadwork_cli.stage1 import load_bundle  # heavy (torch) import only once the arguments are valid

    if settings.runtime.threads:
        import torch

        torch.set_num_threads(settings.runtime.threads)
    model = load_bundle(bundle, device=settings.runtime.device, precision=settings.runtime.precision)
    model.max_pixels = settings.data.max_image_pixels
    model.max_file_bytes = settings.data.max_file_bytes
    loaded = time.perf_counter()

    good = [item for _, item, error in expanded if error is None]
    from roadwork_cli.reporting.progress import progress_bar

    show_bar = len(good) >= 64 and console.is_terminal
    with progress_bar("predicting", total=len(good), unit="img", enabled=show_bar) as advance:
        predictions = model.predict(
            good, batch_size=settings.predict.batch_size, workers=settings.predict.workers, progress=advance
        )
    finished = time.perf_counter()

    by_path = iter(predictions)
    records: list[dict[str, Any]] = []
    for shown, _, error in expanded:
        if error is not None:
            records.append({"path": shown, "p_roadwork": None, "gate": None, "decision": None, "error": error})
            continue
        record = next(by_path).to_dict()
        record["path"] = shown
        record["p_roadwork"] = round_score(record["p_roadwork"])
        record["gate"] = round_score(record["gate"])
        records.append(record)

    if probability_only:
        text = "".join("nan\n" if r["p_roadwork"] is None else f"{r['p_roadwork']:.6f}\n" for r in records)
        _emit(text, out)
    elif fmt == "table":
        if out is not None:
            from rich.console import Console

            buffer = io.StringIO()
            Console(file=buffer, width=160, color_system=None).print(records_table(records))
            _emit(buffer.getvalue(), out)
        else:
            from rich.console import Console

            Console(highlight=False).print(records_table(records))
    else:
        _emit(records_to_text(records, fmt), out)

    failed = [r for r in records if r["error"] is not None]
    _summary(records, len(good), finished - loaded, loaded - started)
    for r in failed[:10]:
        console.print(f"[red]failed[/] {r['path']}: {r['error']}", soft_wrap=True)
    if len(failed) > 10:
        console.print(f"[red]... and {len(failed) - 10} more failed inputs[/]")
    if failed:
        raise typer.Exit(1)


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from roadwork_cli.io.atomic import atomic_write_text

        atomic_write_text(out, text)
        console.print(f"wrote {out}")


def _summary(records: list[dict[str, Any]], n_images: int, seconds: float, load_seconds: float) -> None:
    counts = Counter(r["decision"] or "error" for r in records)
    parts = [f"{name}: {counts.get(name, 0)}" for name in ("roadwork", "no_roadwork", "defer", "error")]
    rate = n_images / seconds if seconds > 0 else float("nan")
    timing = f"{rate:,.1f} img/s (bundle loaded in {load_seconds:.1f} s)"
    console.print(f"{len(records)} inputs | " + " | ".join(parts) + " | " + timing)
