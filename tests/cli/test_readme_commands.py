"""Every `roadwork …` command that README.md shows parses against the real app, and its in-text example runs.

The demo transcript itself is checked by test_demo_cli.py; here it is the commands: those in ```bash blocks and in
inline code spans are parsed as the shell and then Click would (subcommand exists, flags accepted, values of the right
type, required options present), and the synopsis block's flags must exist on their subcommands.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.cli.common import console

README = Path(__file__).resolve().parents[2] / "README.md"
SHELL_OPERATORS = {"&&", "||", "|", ";"}


def _fences(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def _roadwork_argvs(line: str) -> list[tuple[dict[str, str], list[str]]]:
    """``(environment, argv after "roadwork")`` for each `roadwork` invocation in one shell line."""
    found = []
    tokens = shlex.split(line, comments=True)
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in SHELL_OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    for segment in segments:
        if ">" in segment:  # a redirection ends the command's own words
            segment = segment[: segment.index(">")]
        env = {}
        while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", segment[0]):
            key, _, value = segment.pop(0).partition("=")
            env[key] = value
        starts = [i for i, token in enumerate(segment) if token.rsplit("/", 1)[-1] == "roadwork"]
        if starts:  # also `torchrun … --no-python -- roadwork …` and `.venv/bin/roadwork …`
            found.append((env, segment[starts[0] + 1 :]))
    return found


def readme_commands() -> list[tuple[str, dict[str, str], list[str]]]:
    """``(source line, environment, argv)`` of every `roadwork` command in README.md's bash blocks and code spans."""
    text = README.read_text(encoding="utf-8")
    found = []
    for language, body in _fences(text):
        if language == "bash":
            lines = [line for line in body.replace("\\\n", " ").splitlines() if "roadwork" in line]
            found += [(line, env, argv) for line in lines for env, argv in _roadwork_argvs(line)]
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\n]+)`", prose):
        for env, argv in _roadwork_argvs(span) if re.search(r"(^|[\s/])roadwork \S", span) else ():
            if len(argv) > 1 or argv[0].startswith("-"):  # `roadwork info` alone names a command; it runs nothing
                found.append((span, env, argv))
    return found


def synopsis_lines() -> list[str]:
    """The lines of the pipeline synopsis block (``roadwork split --source SRC [--source SRC …] …``)."""
    for language, body in _fences(README.read_text(encoding="utf-8")):
        if not language and body.startswith("roadwork split "):
            return [line for line in body.splitlines() if line.startswith("roadwork ")]
    raise AssertionError("README.md has no synopsis block starting with `roadwork split`")


def _group():
    return typer.main.get_command(app)


def _parse(argv: list[str]) -> None:
    """Parse ``roadwork argv`` as Click would before running it; raises Click's usage errors."""
    group = _group()
    root = group.make_context("roadwork", ["--version"] if not argv else [], resilient_parsing=True)
    if argv[0].startswith("-"):  # root options (--install-completion): checked by name, never run
        names = {opt for param in group.get_params(root) for opt in param.opts}
        assert argv[0] in names, f"roadwork has no option {argv[0]}"
        return
    command = group.get_command(root, argv[0])
    assert command is not None, f"roadwork has no subcommand {argv[0]!r}"
    command.make_context(argv[0], list(argv[1:]), parent=root)


def test_readme_shows_commands_of_every_kind():
    commands = readme_commands()
    subcommands = {argv[0] for _, _, argv in commands if argv}
    assert {"split", "cache-features", "train", "calibrate", "evaluate", "export", "predict", "demo", "info"} <= (
        subcommands
    )
    assert len(commands) >= 40
    assert any("ALLOW_INFEASIBLE" in line for line, _, _ in commands)  # the in-text demo example is found


@pytest.mark.parametrize("line,env,argv", readme_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_readme_command_parses(line, env, argv):
    from roadwork_cli.config import load_settings

    try:
        _parse(argv)
    except typer._click.exceptions.ClickException as exc:  # vendored Click in Typer >= 0.29
        pytest.fail(f"README command does not parse: {line!r}: {exc.format_message()}")
    settings_env = {key: value for key, value in env.items() if key.startswith("ROADWORK_")}
    if settings_env:  # ROADWORK_* variables the README sets must be real settings
        load_settings(None, {}, environ=settings_env)


def test_the_parser_check_catches_a_wrong_flag_and_a_missing_subcommand():
    with pytest.raises(typer._click.exceptions.NoSuchOption):
        _parse(["export", "--run", "r", "--no-such-flag"])
    with pytest.raises(typer._click.exceptions.BadParameter):
        _parse(["train", "--run", "r", "--epochs", "many"])
    with pytest.raises(AssertionError, match="no subcommand"):
        _parse(["deploy", "--run", "r"])


def test_synopsis_flags_exist_on_their_subcommands():
    group = _group()
    root = group.make_context("roadwork", [], resilient_parsing=True)
    for line in synopsis_lines():
        name = line.split()[1]
        command = group.get_command(root, name)
        assert command is not None, line
        accepted = {opt for param in command.get_params(root) for opt in (*param.opts, *param.secondary_opts)}
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
        assert flags and flags <= accepted, f"{line}: {sorted(flags - accepted)} not accepted"


@pytest.mark.slow
def test_readme_demo_example_runs_exports_an_uncertified_bundle_and_says_so(tmp_path, monkeypatch):
    """`ROADWORK_MODEL__BACKBONE=tiny_vit ROADWORK_CALIBRATION__ALLOW_INFEASIBLE=true roadwork demo --per-class 40`."""
    (line, env, argv) = next(c for c in readme_commands() if c[2][:1] == ["demo"] and "ALLOW_INFEASIBLE" in c[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(console, "_width", 400)
    result = CliRunner().invoke(app, argv, env=env)
    assert result.exit_code == 0, f"{line}\n{result.output}"
    assert (tmp_path / "runs" / "demo" / "bundle.tar").is_file()
    output = " ".join(result.output.split())
    # 40 images per class leave ~15 roadwork images in val_calib, far below the ~263 exited positives that certifying
    # FNR <= 2 % at delta 0.1 needs (calibration.stats.positives_needed), so this calibration is always infeasible.
    assert "warning: Exporting an uncertified calibration" in output
    assert "demo finished" in output and "The bundle is uncertified" in output
    # Python's own warning format (file:line: Category: message) never reaches the user.
    assert not re.search(r"\.py:\d+: \w*Warning", result.output) and "warnings.warn" not in result.output
