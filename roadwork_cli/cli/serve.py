"""``roadwork serve``: one verified bundle behind HTTP (LitServe, dynamic batching); the server is
:mod:`roadwork_cli.serving`, records are ``predict``'s own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    DeviceOption,
    RuntimeOption,
    ThreadsOption,
    console,
    handle_errors,
    runtime_overrides,
)


@handle_errors
def command(
    bundle: Annotated[Path, typer.Option("--bundle", help="bundle.tar from `roadwork export`.")],
    host: Annotated[
        str | None, typer.Option("--host", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::.")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port (default 8000).")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Inference processes, one loaded bundle each (default 1).")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", min=1, help="Most requests per forward pass (default 8).")
    ] = None,
    batch_timeout_ms: Annotated[
        float | None,
        typer.Option("--batch-timeout-ms", min=0, help="Wait this long for a batch to fill (default 5 ms)."),
    ] = None,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            "--request-timeout", min=0.001, help="Seconds before an unanswered request gets 504 (default 30)."
        ),
    ] = None,
    quiet: Annotated[bool | None, typer.Option("--quiet", help="No log line per request.", show_default=False)] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    runtime: RuntimeOption = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Serve stage 1 over HTTP: POST /predict, GET /healthz /readyz /info /metrics /docs; SIGTERM drains."""
    from roadwork_cli.cli.common import resolve_settings
    from roadwork_cli.cli.info import bundle_info
    from roadwork_cli.cli.predict import stream_records

    serve = {
        "host": host,
        "port": port,
        "workers": workers,
        "max_batch_size": max_batch_size,
        "batch_timeout_ms": batch_timeout_ms,
        "request_timeout_s": request_timeout,
        "quiet": quiet or None,
    }
    overrides = {
        "runtime": runtime_overrides(device=device, threads=threads),
        "serve": serve,
        "predict": {"runtime": runtime},
    }
    settings = resolve_settings(config, overrides, write_to_run=False)  # flags not given (None) are skipped
    # verifies every member before anything binds: a bad bundle exits 2 here
    info = bundle_info(bundle, settings.runtime.device, settings.runtime.precision, settings.predict.runtime)
    if info["predict_runtime"]["runtime"] == "torch":  # refused here, not in a worker after the port is bound
        from roadwork_cli.errors import require_module

        require_module("torch")

    from roadwork_cli.serving import Server, configure_log  # LitServe, FastAPI; no torch (workers load the model)

    configure_log(settings.serve.quiet)
    server = Server(bundle, settings, info, stream_records)
    s = settings.serve
    console.print(
        f"serving {bundle} on http://{s.host}:{s.port} ({s.workers} worker(s), batches of up to {s.max_batch_size} "
        f"requests, {s.batch_timeout_ms:g} ms batch wait, {s.request_timeout_s:g} s request timeout); "
        f"GET /readyz turns 200 once the bundle is loaded and warmed; docs at /docs",
        soft_wrap=True,
    )
    server.run()
    if server.unanswered:
        console.print(f"[yellow]stopped after the drain timeout[/] with {server.unanswered} requests unanswered")
    else:
        console.print("stopped: every accepted request was answered")
