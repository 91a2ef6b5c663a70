"""``roadwork predict``: images in, roadwork / no_roadwork / defer out.

Every input gets exactly one record, good or bad, written as soon as its batch is done (in input order, flushed); the
command exits 1 when any input failed. With ``--out`` records go to ``<out>.partial`` first and the file is renamed to
``<out>`` when all inputs are done, so an interrupted run keeps its records in ``<out>.partial``. Input expansion and
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

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    DeviceOption,
    RuntimeOption,
    ThreadsOption,
    apply_threads,
    check_device,
    complete_setting_choices,
    console,
    handle_errors,
    runtime_overrides,
    setting_default,
)
from roadwork_cli.io.inputs import FIELDS, FORMATS, PARTIAL_SUFFIX, RecordWriter, expand_inputs, round_score


def records_table(records: list[dict[str, Any]], rule: Any = None):
    """A rich table of records (for terminals).

    With the band rule the gate has no effect on decisions, so its column is left out and a caption says so.
    """
    from rich.table import Table

    band = getattr(rule, "rule", "gate") == "band"
    table = Table(title="stage 1 predictions", show_lines=False)
    columns = [
        (name, justify) for name, justify in zip(FIELDS, ("left", "right", "right", "left", "left"), strict=True)
    ]
    if band:
        columns = [c for c in columns if c[0] != "gate"]
        table.caption = band_caption(rule)
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    styles = {"roadwork": "bold red", "no_roadwork": "green", "defer": "yellow"}
    for r in records:
        decision = r["decision"] or "-"
        cells = {
            "path": r["path"],
            "p_roadwork": "-" if r["p_roadwork"] is None else f"{r['p_roadwork']:.4f}",
            "gate": "-" if r["gate"] is None else f"{r['gate']:.4f}",
            "decision": f"[{styles.get(decision, 'dim')}]{decision}[/]",
            "error": r["error"] or "",
        }
        table.add_row(*(cells[name] for name, _ in columns))
    return table


def band_caption(rule: Any) -> str:
    """How the band rule decides, with its thresholds (the gate score is not used)."""
    return (
        f"band rule: decided on p alone (roadwork if p >= b = {rule.b:.4g}, no_roadwork if p < tau = {rule.tau:.4g}, "
        "defer in between); the gate column has no effect and is hidden"
    )


def guarantee_line(rule: Any) -> str | None:
    """The summary's word on the guarantee (``guarantee_statement``), in yellow when there is none."""
    from roadwork_cli.reporting.tables import NO_GUARANTEE, guarantee_statement

    statement = guarantee_statement(getattr(rule, "params", None) or {})
    return f"[yellow]{statement}[/]" if statement and statement.startswith(NO_GUARANTEE) else statement


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
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image files, folders, globs, .csv/.jsonl manifests, .parquet files, or - for stdin."),
    ],
    bundle: Annotated[
        Path, typer.Option("--bundle", help="bundle.tar from `roadwork export`, or its --format hf folder.")
    ],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="table | jsonl | csv; auto: a table on a terminal, else jsonl (with --out, a .csv suffix picks csv).",
            show_default=setting_default("predict.format", "auto"),
            autocompletion=complete_setting_choices("predict.format"),
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write records here (as OUT.partial until every input is done).")
    ] = None,
    probability_only: Annotated[
        bool,
        typer.Option(
            "--probability-only",
            help="Print only calibrated p_roadwork per input (for NATIX validators; not stage 1's decision).",
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine", help="local: this process; ray: a Ray Data actor pool (pip install 'roadwork-cli[ray]')."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Ray cluster to join (auto, ray://HEAD:10001); default: a local Ray."),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option("--ray-actors", min=1, help="Actors, one loaded bundle each (default: CPUs / --threads)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="--engine ray: keep OUT's records and score only the other inputs.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="--engine ray: replace an existing OUT.")] = False,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    runtime: RuntimeOption = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Run stage 1 on images and write one record per input, as each batch finishes."""
    from roadwork_cli.cli.common import resolve_settings

    overrides = {
        "runtime": runtime_overrides(device=device, threads=threads),
        "predict": {"format": format, "runtime": runtime},
    }
    settings = resolve_settings(config, overrides, write_to_run=False)  # flags not given (None) are skipped
    fmt = (
        "probability" if probability_only else choose_format(format, settings.predict.format, out, sys.stdout.isatty())
    )
    check_device(settings)
    if engine not in ("local", "ray"):
        from roadwork_cli.errors import UsageError

        raise UsageError(f"--engine must be local or ray (got {engine!r}).")
    if engine == "ray":
        ray_options = dict(address=ray_address, actors=ray_actors, resume=resume, overwrite=overwrite)
        _predict_with_ray(inputs, bundle, out, format, fmt, settings, ray_options, debug)
        return
    if ray_address or ray_actors or resume or overwrite:
        from roadwork_cli.errors import UsageError

        raise UsageError("--ray-address, --ray-actors, --resume and --overwrite go with --engine ray.")
    skipped: list[str] = []
    expanded = expand_inputs(inputs, skipped=skipped)

    started = time.perf_counter()
    from roadwork_cli.stage1 import load_bundle  # torch is imported only if the bundle runs with PyTorch

    model = load_bundle(
        bundle,
        device=settings.runtime.device,
        precision=settings.runtime.precision,
        jpeg_draft=settings.data.jpeg_draft,  # None: decode as calibration did (the bundle's recipe)
        threads=settings.runtime.threads,  # onnxruntime's; an ONNX bundle must not import torch to set them
        runtime=settings.predict.runtime,
    )
    if getattr(model, "runtime", "torch") == "torch":
        apply_threads(settings)
    model.max_pixels = settings.data.max_image_pixels
    model.max_file_bytes = settings.data.max_file_bytes
    model.threads = settings.runtime.threads  # per CPU stream (predict.streams)
    loaded = time.perf_counter()
    if probability_only:
        console.print(
            "note: --probability-only prints calibrated p(roadwork) for NATIX validators (> 0.5 = roadwork); stage 1's "
            "decisions use the calibrated thresholds and can differ.",
            soft_wrap=True,
        )

    writer = RecordWriter(fmt, out) if fmt != "table" else None
    records: list[dict[str, Any]] = []
    good = [item for _, item, error in expanded if error is None]
    show_bar = len(good) >= 64 and console.is_terminal  # the model draws it, on stderr
    try:
        predictions = model.iter_predict(
            good,
            batch_size=settings.predict.batch_size,
            workers=settings.predict.workers,
            progress=show_bar,
            streams=settings.predict.streams,
        )
        for record in stream_records(expanded, predictions):
            records.append(record)
            if writer is not None:
                writer.write(record)
    except KeyboardInterrupt:
        if writer is not None:
            where = writer.abort()
        else:  # a table is only rendered whole: what was done goes to OUT.partial, never to OUT
            where = _render_table(
                records, model.rule, None if out is None else out.with_name(out.name + PARTIAL_SUFFIX)
            )
        kept = writer.written if writer is not None else len(records)
        console.print(
            f"[yellow]interrupted[/] after {kept} of {len(expanded)} inputs: {kept} records kept in {where}. "
            "predict does not resume; run it again on the remaining inputs.",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader went away (`roadwork predict DIR | head`): stop quietly, as other Unix tools do.
        _silence_stdout()
        console.print(f"stdout was closed after {writer.written} of {len(expanded)} records; stopped.")
        raise typer.Exit(141) from None
    finished = time.perf_counter()
    if writer is not None:
        writer.finish()
        if out is not None:
            console.print(f"wrote {out}")
    else:
        _render_table(records, model.rule, out)

    failed = [r for r in records if r["error"] is not None]
    _summary(records, len(good), finished - loaded, loaded - started, skipped, model.rule, band_line=fmt != "table")
    for r in failed[:10]:
        console.print(f"[red]failed[/] {r['path']}: {r['error']}", soft_wrap=True)
    if len(failed) > 10:
        console.print(f"[red]... and {len(failed) - 10} more failed inputs[/]")
    if debug or settings.runtime.debug:
        for path in skipped:
            console.print(f"[dim]skipped (not an image file)[/] {path}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _predict_with_ray(
    inputs: list[str],
    bundle: Path,
    out: Path | None,
    requested: str | None,
    fmt: str,
    settings: Any,
    options: dict[str, Any],
    debug: bool,
) -> None:
    """``--engine ray``: :func:`roadwork_cli.batch_ray.score_with_ray`, then the summary plain ``predict`` prints."""
    from roadwork_cli.batch_ray import score_with_ray

    result = score_with_ray(
        inputs,
        bundle,
        out,
        fmt=None if out is None or requested in (None, "auto") else requested,
        threads=settings.runtime.threads,
        batch_size=settings.predict.batch_size,
        workers=settings.predict.workers,
        device=settings.runtime.device,
        runtime=settings.predict.runtime,
        precision=settings.runtime.precision,
        jpeg_draft=settings.data.jpeg_draft,
        limits=(settings.data.max_image_pixels, settings.data.max_file_bytes),
        progress=console.is_terminal,
        **options,
    )
    records = result.records
    if out is not None:
        console.print(f"wrote {out}")
    elif fmt == "table":
        _render_table(records, result.rule, None)
    else:
        writer = RecordWriter(fmt)
        for record in records:
            writer.write(record)
    if result.resumed:
        console.print(f"resumed: {result.resumed} records kept from the earlier run", soft_wrap=True)
    actors = f"{result.actors} Ray actor" + ("s" if result.actors != 1 else "")
    note = (
        f"{result.scored} scored by {actors}; Ray start and bundle loading included" if result.scored else "none left"
    )
    _summary(records, result.scored, result.seconds, 0.0, result.skipped, result.rule, fmt != "table", note)
    failed = [r for r in records if r["error"] is not None]
    for r in failed[:10]:
        console.print(f"[red]failed[/] {r['path']}: {r['error']}", soft_wrap=True)
    if len(failed) > 10:
        console.print(f"[red]... and {len(failed) - 10} more failed inputs[/]")
    if debug or settings.runtime.debug:
        for path in result.skipped:
            console.print(f"[dim]skipped (not an image file)[/] {path}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a real file descriptor (tests): nothing will flush to it at exit


def stream_records(expanded: list[tuple[str, Any, str | None]], predictions) -> Any:
    """Merge expansion errors and model predictions back into input order, one record dict at a time.

    Args:
        expanded: ``(shown path, item, error)`` per input, as from ``expand_inputs``.
        predictions: ``Prediction`` objects for the inputs without an expansion error, in their order (an iterator:
            each record is yielded as soon as its prediction arrives).
    """
    predictions = iter(predictions)
    for shown, _, error in expanded:
        if error is not None:
            yield {"path": shown, "p_roadwork": None, "gate": None, "decision": None, "error": error}
            continue
        record = next(predictions).to_dict()
        record["path"] = shown
        record["p_roadwork"] = round_score(record["p_roadwork"])
        record["gate"] = round_score(record["gate"])
        yield record


def _render_table(records: list[dict[str, Any]], rule: Any, out: Path | None) -> str:
    """Print the table to the terminal, or write it to ``out``; returns where it went."""
    from rich.console import Console

    if out is None:
        Console(highlight=False).print(records_table(records, rule))
        sys.stdout.flush()  # before the summary on stderr, so that a terminal shows them in order
        return "the table above"
    from roadwork_cli.io.atomic import atomic_write_text

    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None).print(records_table(records, rule))
    atomic_write_text(out, buffer.getvalue())
    console.print(f"wrote {out}")
    return str(out)


def _summary(
    records: list[dict[str, Any]],
    n_images: int,
    seconds: float,
    load_seconds: float,
    skipped: list[str],
    rule: Any,
    band_line: bool = True,
    load_note: str | None = None,
) -> None:
    counts = Counter(r["decision"] or "error" for r in records)
    parts = [f"{name}: {counts.get(name, 0)}" for name in ("roadwork", "no_roadwork", "defer", "error")]
    if skipped:
        parts.append(
            f"skipped non-image files: {len(skipped)}" + ("" if len(skipped) > 3 else f" ({', '.join(skipped)})")
        )
    rate = n_images / seconds if seconds > 0 else float("nan")
    timing = f"{rate:,.1f} img/s ({load_note or f'bundle loaded in {load_seconds:.1f} s'})"
    console.print(f"{len(records)} inputs | " + " | ".join(parts) + " | " + timing, soft_wrap=True)
    line = guarantee_line(rule)
    if line:
        console.print(line, soft_wrap=True)
    if band_line and getattr(rule, "rule", "gate") == "band":  # the table says it in its caption
        console.print(band_caption(rule).replace("column has no effect and is hidden", "has no effect"), soft_wrap=True)
    if skipped and len(skipped) > 3:
        console.print(
            "[dim]non-image files in folders are skipped; --debug lists them, and .csv/.jsonl manifests and "
            ".parquet files are read when given as inputs themselves[/]",
            soft_wrap=True,
        )
