"""What every subcommand shares: option types, settings resolution, error rendering. No tensor code here."""

from __future__ import annotations

import functools
import json
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from roadwork_cli.errors import RoadworkError, missing_extra

console = Console(stderr=True, highlight=False)
"""Progress, tables and messages go to stderr so that stdout stays machine-readable (predict --format jsonl)."""


def setting_default(key: str, value: str) -> str:
    """What ``--help`` shows as the default of a flag that overrides setting ``key``: ``"calibration.fnr = 0.02"``.

    The flag's own default is ``None`` (not given: the settings decide), so Typer would show nothing. The value is
    written here rather than read from ``Settings`` because importing pydantic would slow ``roadwork --help``;
    ``tests/cli/test_app.py`` checks every such value against ``Settings``' defaults.
    """
    return f"{key} = {value}"


DEVICES = ("auto", "cpu", "cuda", "mps")
"""What ``--device`` completes to (``cuda:N`` picks one GPU)."""

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (defaults < YAML < ROADWORK_* env < flags).")
]
RunOption = Annotated[Path | None, typer.Option("--run", help="Run directory holding every stage's artifacts.")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the summary as one JSON object on stdout (tables stay on stderr).")
]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="Where to compute: auto, cpu, cuda, cuda:N or mps (runtime.device).",
        show_default=setting_default("runtime.device", "auto"),
        autocompletion=lambda incomplete: [d for d in DEVICES if d.startswith(incomplete)],
    ),
]
ThreadsOption = Annotated[
    int | None, typer.Option("--threads", min=1, help="torch intra-op CPU threads (runtime.threads).")
]
RuntimeOption = Annotated[
    str | None,
    typer.Option(
        "--runtime",
        help="What computes the scores: onnx (the bundle's model.onnx in onnxruntime, no torch) or torch; by default "
        "ONNX when the bundle has a graph and runs on the CPU in fp32, else PyTorch (predict.runtime).",
        show_default=setting_default("predict.runtime", "auto"),
        autocompletion=lambda incomplete: [r for r in ("auto", "onnx", "torch") if r.startswith(incomplete)],
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def complete_setting_choices(key: str) -> Callable[[str], list[str]]:
    """A Typer ``autocompletion`` callback offering the choices of setting ``key`` (a ``Literal`` field)."""

    def complete(incomplete: str) -> list[str]:
        from typing import get_args

        from roadwork_cli.config import Settings  # imported when the shell asks, never for --help

        section, field = key.split(".")
        annotation = type(getattr(Settings(), section)).model_fields[field].annotation
        return [str(choice) for choice in get_args(annotation) if str(choice).startswith(incomplete)]

    return complete


def complete_backbone(incomplete: str) -> list[tuple[str, str]]:
    """Typer ``autocompletion`` for ``--backbone``: the registry's names with their descriptions, and the prefixes."""
    from roadwork_cli.model.backbones import list_backbones  # imports torch: only when the shell asks

    choices = dict(list_backbones(with_descriptions=True))
    choices |= {"timm:": "any timm model, timm:<name>", "hf:": "a transformers model, hf:<repo id or local dir>"}
    return [(name, about) for name, about in choices.items() if name.startswith(incomplete)]


def _hide_switch_placeholders(params: list) -> list:
    """Switches take no value, so their help shows none (Typer would print ``<bool>`` in the value column)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class RoadworkCommand(TyperCommand):
    """A subcommand whose help lists switches without a value placeholder."""

    def get_params(self, ctx):  # noqa: D102 - see the class docstring
        return _hide_switch_placeholders(super().get_params(ctx))


class RoadworkGroup(TyperGroup):
    """The ``roadwork`` group, its help drawn like its subcommands' (see :class:`RoadworkCommand`)."""

    def get_params(self, ctx):  # noqa: D102 - see the class docstring
        return _hide_switch_placeholders(super().get_params(ctx))


_SETTINGS_DEBUG = {"on": False, "flag": False}
"""``runtime.debug`` from YAML or the environment (``on``), noted by :func:`resolve_settings` so that errors honour it
too, and the running command's ``--debug`` (``flag``), which warnings honour."""


def render_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """``warnings.showwarning`` while a command runs: one ``warning:`` line on the console, no source path.

    Python's own rendering prints the file and line that raised the warning, which is for whoever develops roadwork,
    not for its user; ``--debug`` (``runtime.debug``) adds them back.
    """
    kind = "" if issubclass(category, UserWarning) else f" ({category.__name__})"
    where = f" [dim]{escape(f'({filename}:{lineno})')}[/]" if _SETTINGS_DEBUG["on"] or _SETTINGS_DEBUG["flag"] else ""
    console.print(f"[yellow]warning{kind}:[/] {escape(str(message))}{where}", soft_wrap=True)


def fail(message: str, exit_code: int, debug: bool = False) -> typer.Exit:
    """Print one paragraph (and the traceback when debugging) and return the Exit to raise."""
    if debug or _SETTINGS_DEBUG["on"]:
        traceback.print_exc(file=sys.stderr)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # "roadwork-cli[onnx]" is not markup
    return typer.Exit(exit_code)


def handle_errors(func: F) -> F:
    """Turn library errors into the contract's exit codes: RoadworkError -> its code, anything else -> 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        _SETTINGS_DEBUG["on"] = False  # a previous command in this process (tests) must not leak its setting
        _SETTINGS_DEBUG["flag"] = debug
        try:
            with warnings.catch_warnings():  # restores Python's renderer when the command ends (tests share a process)
                warnings.showwarning = render_warning
                return func(*args, **kwargs)
        except typer.Exit:
            raise
        except RoadworkError as exc:
            raise fail(str(exc), exc.exit_code, debug) from None
        except KeyboardInterrupt:
            raise fail("interrupted; re-run the same command to resume.", 130, debug) from None
        except ModuleNotFoundError as exc:
            missing = missing_extra(exc)  # the inference-only install: name the extra, exit 2, no traceback
            if missing is None:
                raise fail(f"{type(exc).__name__}: {exc} (re-run with --debug for the traceback)", 1, debug) from None
            raise fail(str(missing), missing.exit_code, debug) from None
        except Exception as exc:  # noqa: BLE001 - the CLI boundary: one paragraph, no traceback unless --debug
            name = type(exc).__name__
            raise fail(f"{name}: {exc} (re-run with --debug for the traceback)", 1, debug) from None

    return wrapper  # type: ignore[return-value]


def resolve_settings(
    config: Path | None, overrides: dict[str, Any], write_to_run: bool = True, switches_backbone: bool = False
):
    """Load settings (defaults < YAML < env < flags) and write the resolved copy to ``<run>/config.yaml``.

    With a run, the backbone is the run's (``features/current.json``); an explicit other one is a usage error unless
    the command ``switches_backbone`` (``cache-features``).
    """
    from roadwork_cli.config import load_settings
    from roadwork_cli.io.atomic import atomic_write_text
    from roadwork_cli.io.run import RunDir

    settings = load_settings(config, overrides)
    _SETTINGS_DEBUG["on"] = settings.runtime.debug
    if write_to_run and settings.runtime.run is not None:
        from roadwork_cli.features.current import with_run_backbone

        run = RunDir(settings.runtime.run).ensure()
        # A run that has features has a backbone: config.yaml records it, not the settings' default, and an explicit
        # other one is refused here, before anything is written (cache-features is the command that switches it).
        settings = with_run_backbone(run, settings, "This command", switch=switches_backbone)
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


def check_device(settings) -> None:
    """Fail now, with exit 2, when ``runtime.device`` names a GPU this machine lacks (before any image is read).

    ``auto`` and ``cpu`` always exist and are not checked, so commands that may run without torch (predict on an ONNX
    bundle, evaluate --scores) do not import it here.
    """
    if settings.runtime.device not in ("auto", "cpu"):
        from roadwork_cli.runtime.device import resolve_device

        resolve_device(settings.runtime.device)


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
