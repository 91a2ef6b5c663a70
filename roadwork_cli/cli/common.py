"""What every subcommand shares: option types, settings resolution, error rendering. No tensor code here."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from roadwork_cli.errors import RoadworkError

console = Console(stderr=True, highlight=False)
"""Progress, tables and messages go to stderr so that stdout stays machine-readable (predict --format jsonl)."""

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (defaults < YAML < ROADWORK_* env < flags).")
]
RunOption = Annotated[Path | None, typer.Option("--run", help="Run directory holding every stage's artifacts.")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the summary as one JSON object on stdout (tables stay on stderr).")
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="Where to compute: auto, cpu, cuda, cuda:N or mps (runtime.device).")
]
ThreadsOption = Annotated[
    int | None, typer.Option("--threads", min=1, help="torch intra-op CPU threads (runtime.threads).")
]

F = TypeVar("F", bound=Callable[..., Any])


_SETTINGS_DEBUG = {"on": False}
"""``runtime.debug`` from YAML or the environment, noted by :func:`resolve_settings` so that errors honour it too."""


def fail(message: str, exit_code: int, debug: bool = False) -> typer.Exit:
    """Print one paragraph (and the traceback when debugging) and return the Exit to raise."""
    if debug or _SETTINGS_DEBUG["on"]:
        traceback.print_exc(file=sys.stderr)
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(exit_code)


def handle_errors(func: F) -> F:
    """Turn library errors into the contract's exit codes: RoadworkError -> its code, anything else -> 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        _SETTINGS_DEBUG["on"] = False  # a previous command in this process (tests) must not leak its setting
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except RoadworkError as exc:
            raise fail(str(exc), exc.exit_code, debug) from None
        except KeyboardInterrupt:
            raise fail("interrupted; re-run the same command to resume.", 130, debug) from None
        except Exception as exc:  # noqa: BLE001 - the CLI boundary: one paragraph, no traceback unless --debug
            name = type(exc).__name__
            raise fail(f"{name}: {exc} (re-run with --debug for the traceback)", 1, debug) from None

    return wrapper  # type: ignore[return-value]


def resolve_settings(config: Path | None, overrides: dict[str, Any], write_to_run: bool = True):
    """Load settings (defaults < YAML < env < flags) and write the resolved copy to ``<run>/config.yaml``."""
    from roadwork_cli.config import load_settings
    from roadwork_cli.io.atomic import atomic_write_text
    from roadwork_cli.io.run import RunDir

    settings = load_settings(config, overrides)
    _SETTINGS_DEBUG["on"] = settings.runtime.debug
    if write_to_run and settings.runtime.run is not None:
        run = RunDir(settings.runtime.run).ensure()
        atomic_write_text(run.config, settings.to_yaml())
    return settings


def require_run(settings) -> Path:
    """The run directory from settings, or a usage error."""
    from roadwork_cli.errors import UsageError

    if settings.runtime.run is None:
        raise UsageError("No run directory: pass --run DIR (or set runtime.run in the settings file).")
    return Path(settings.runtime.run)


def runtime_overrides(run: Path | None = None, device: str | None = None, threads: int | None = None) -> dict:
    """The ``runtime`` section of the flag overrides (flags not given stay ``None`` and are skipped)."""
    return {"run": run, "device": device, "threads": threads}


def join_job(command: str, settings):
    """The torchrun job this process is a rank of, or a one-process stand-in; rank 0 names the job once.

    A command launched as ``torchrun ... --no-python -- roadwork <command> ...`` runs on every rank; after the library
    call only ``dist.is_main`` prints and writes the summary.
    """
    from roadwork_cli.runtime.distributed import distributed_from_env

    dist = distributed_from_env(settings.runtime.device)
    if dist.enabled and dist.is_main:
        console.print(f"{command}: {dist.describe()}")
    return dist


def apply_threads(settings) -> None:
    """Honour ``runtime.threads`` for commands whose library call does not (torch imported only when set)."""
    if settings.runtime.threads:
        import torch

        torch.set_num_threads(settings.runtime.threads)


def print_json(summary: Any) -> None:
    """Write ``summary`` as ONE JSON object on stdout (the ``--json`` contract: nothing else goes to stdout)."""
    from roadwork_cli.io.atomic import json_safe

    sys.stdout.write(json.dumps(json_safe(summary, printable=True), ensure_ascii=False, allow_nan=False) + "\n")
    sys.stdout.flush()
