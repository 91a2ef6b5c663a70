"""roadwork demo end to end with a tiny backbone, and its settings layering."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.cli.common import console

runner = CliRunner()
TINY = {
    "ROADWORK_MODEL__BACKBONE": "tiny_vit",
    # Loose targets that 100 synthetic images can certify, so the run prints what a certified `make demo` prints;
    # the two escape hatches keep the pipeline finishing should a model change make them infeasible.
    "ROADWORK_CALIBRATION__FNR": "0.4",
    "ROADWORK_CALIBRATION__COVERAGE": "0.5",
    "ROADWORK_CALIBRATION__DELTA": "0.4",
    "ROADWORK_CALIBRATION__ALLOW_INFEASIBLE": "true",
    "ROADWORK_EXPORT__ALLOW_UNCERTIFIED": "true",
}
TINY_PER_CLASS = 50
README = Path(__file__).resolve().parents[2] / "README.md"
TRANSCRIPT_MARKERS = ("<!-- demo-transcript:start -->", "<!-- demo-transcript:end -->")


def test_demo_settings_layering(tmp_path):
    from roadwork_cli.pipeline import DEMO_PER_CLASS, demo_settings

    settings = demo_settings(None, environ={})
    assert settings.data.sources == [f"synthetic:{2 * DEMO_PER_CLASS}"]
    assert settings.data.fractions == (0.4, 0.1, 0.3, 0.2)
    assert str(settings.runtime.run) == "runs/demo"
    config = tmp_path / "demo.yaml"
    config.write_text("data:\n  fractions: [0.5, 0.1, 0.2, 0.2]\nruntime:\n  run: elsewhere\n")
    settings = demo_settings(config, per_class=10, environ={"ROADWORK_CALIBRATION__FNR": "0.05"})
    assert settings.data.fractions == (0.5, 0.1, 0.2, 0.2)  # the user's YAML beats the demo defaults
    assert settings.calibration.fnr == 0.05  # environment beats both
    assert settings.data.sources == ["synthetic:20"] and str(settings.runtime.run) == "elsewhere"
    assert str(demo_settings(config, per_class=10, run=tmp_path / "x", environ={}).runtime.run) == str(tmp_path / "x")


def test_demo_device_and_threads_flags_beat_the_environment_and_are_validated():
    from roadwork_cli.errors import UsageError
    from roadwork_cli.pipeline import demo_settings

    environ = {"ROADWORK_RUNTIME__THREADS": "3", "ROADWORK_RUNTIME__DEVICE": "cpu"}
    from_env = demo_settings(None, environ=environ)
    assert (from_env.runtime.threads, from_env.runtime.device) == (3, "cpu")  # flags not given: lower layers stand
    flagged = demo_settings(None, environ=environ, device="auto", threads=2)
    assert (flagged.runtime.threads, flagged.runtime.device) == (2, "auto")
    with pytest.raises(UsageError, match="threads"):
        demo_settings(None, environ={}, threads=0)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, str]:
    """One tiny demo through the CLI, run as `make demo` runs it (``--run runs/demo`` from a fresh folder).

    Returns the run directory and everything the first run printed. The console is made wide enough that no table
    cell wraps, so each table row prints on one line whatever the terminal.
    """
    root = tmp_path_factory.mktemp("tiny_demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(console, "_width", 400)
        patch.setattr(console, "_height", 50)
        result = runner.invoke(app, ["demo", "--run", "runs/demo", "--per-class", str(TINY_PER_CLASS)], env=TINY)
    assert result.exit_code == 0, result.output
    return root / "runs" / "demo", result.output


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end_and_reruns(tiny_demo, monkeypatch):
    run, output = tiny_demo
    monkeypatch.chdir(run.parents[1])  # re-run it as it ran: `--run runs/demo`, which the artifacts record
    for artifact in ("splits.json", "checkpoints/best.safetensors", "calibration/scrc_params.json", "bundle.tar"):
        assert (run / artifact).is_file(), artifact
    report = json.loads((run / "eval" / "report.json").read_text())
    assert {"coverage", "fnr_on_exits", "guarantee"} <= set(report)
    assert "predict from the bundle" in output and "bundle.tar" in output
    with tarfile.open(run / "bundle.tar") as tar:  # the demo's bundle runs without torch
        assert "model.onnx" in tar.getnames()
    assert re.search(
        r"model\.onnx\s+verified against PyTorch \(max abs diff [0-9.e+-]+\)",
        _BOX_DRAWING.sub(" ", _ANSI.sub("", output)),
    )
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["samples"]) == 2 * TINY_PER_CLASS

    # Re-running re-uses the rendered scenes, cached features and finished training.
    reused = [*(run / "synthetic").rglob("*.jpg"), *(run / "features").rglob("*.safetensors")]
    assert len(reused) > 2 * TINY_PER_CLASS
    stamps = {p: p.stat().st_mtime_ns for p in reused}
    params_before = (run / "calibration" / "scrc_params.json").read_text()
    again = runner.invoke(
        app, ["demo", "--run", "runs/demo", "--per-class", str(TINY_PER_CLASS), "--json", "--threads", "1"], env=TINY
    )
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)  # --json: one object on stdout, the stage tables stay on stderr
    assert summary["bundle"] == str(Path("runs/demo/bundle.tar")) and summary["report"]["n"] == report["n"]
    assert list(summary["stages"]) == ["split", "cache-features", "train", "calibrate", "evaluate", "export", "predict"]
    assert len(summary["predictions"]) == 8 and {"decision", "label"} <= set(summary["predictions"][0])
    assert "threads: 1" in (run / "config.yaml").read_text()
    assert {p: p.stat().st_mtime_ns for p in reused} == stamps
    assert (run / "calibration" / "scrc_params.json").read_text() == params_before  # same end result

    predicted = runner.invoke(
        app, ["predict", str(run / "synthetic"), "--bundle", str(run / "bundle.tar"), "--format", "jsonl"]
    )
    assert predicted.exit_code == 0, predicted.output
    assert len(predicted.stdout.splitlines()) == 2 * TINY_PER_CLASS


def test_demo_rejects_bad_per_class(tmp_path):
    result = runner.invoke(app, ["demo", "--run", str(tmp_path / "d"), "--per-class", "0"], env=TINY)
    assert result.exit_code == 2


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BOX_DRAWING = re.compile(r"[\u2500-\u259f]")  # rich's table borders
_ASCII_BORDER = re.compile(r"[\s+\-=|:]*")  # a whole border line of an ASCII-only table
_ASCII_BAR = re.compile(r"(?:^|(?<=\s))\|(?=\s|$)")  # an ASCII-only table's column separator
_HEX_HASH = re.compile(r"\b[0-9a-f]{8,}\b")  # fingerprints
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _normalise(line: str) -> str:
    """A printed line's structure: no colour codes or table borders, every number (and hash) '#', spaces collapsed."""
    line = _BOX_DRAWING.sub(" ", _ANSI.sub("", line))
    if _ASCII_BORDER.fullmatch(line):
        return ""
    line = _NUMBER.sub("#", _HEX_HASH.sub("#", _ASCII_BAR.sub(" ", line)))
    return " ".join(line.split())


def unprinted_lines(claimed: list[str], printed: str) -> list[str]:
    """The lines of ``claimed`` that ``printed`` does not show, in order, up to numbers and table layout.

    Each claimed line, normalised, must occur as a run of whole words in the normalised printed text, after the
    previous claimed line's match. The printed lines are joined before matching so that prose rich wrapped (table
    captions) can still be quoted whole; a claimed line may drop leading or trailing cells of a row (abridged) but
    never add, reorder or change a word. A line of nothing but ``…`` marks rows left out (their wording depends on
    the outcome, e.g. which images a model gets right) and is not matched.
    """
    text = " " + " ".join(filter(None, map(_normalise, printed.splitlines()))) + " "
    missing, position = [], 0
    for line in claimed:
        wanted = _normalise(line)
        if not wanted or set(wanted.split()) == {"…"}:
            continue  # blank lines, table borders and elisions
        found = text.find(f" {wanted} ", position)
        if found < 0:
            missing.append(line)
        else:
            position = found + len(wanted) + 1
    return missing


def readme_transcript() -> list[str]:
    """The lines of the README's demo transcript block, between its two markers (code fences left out)."""
    start, end = TRANSCRIPT_MARKERS
    text = README.read_text(encoding="utf-8")
    assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), TRANSCRIPT_MARKERS
    block = text.split(start, 1)[1].split(end, 1)[0]
    return [line for line in block.splitlines() if not line.lstrip().startswith("```")]


@pytest.mark.slow
def test_readme_demo_transcript_is_what_the_demo_prints(tiny_demo):
    from roadwork_cli.config import Settings

    _run, output = tiny_demo
    # The README quotes `make demo` on the default backbone; the tiny backbone stands in for it here.
    printed = output.replace(TINY["ROADWORK_MODEL__BACKBONE"], Settings().model.backbone)
    claimed = readme_transcript()
    assert len([line for line in claimed if _normalise(line)]) >= 10, "the README's transcript block is (nearly) empty"
    missing = unprinted_lines(claimed, printed)
    assert not missing, "README transcript lines the demo does not print:\n" + "\n".join(missing)


@pytest.mark.slow
def test_transcript_check_refuses_invented_reordered_and_changed_lines(tiny_demo):
    _run, printed = tiny_demo
    real = [
        "│ backbone               │ tiny_vit (0123abcd4567ef89) │",
        "export (12.5 s)",
        "│ bundle │ runs/demo/bundle.tar │",
    ]
    assert unprinted_lines(real, printed) == []  # numbers, hashes, spacing and borders may differ
    assert unprinted_lines(["  ┃ split      ┃ roadwork ┃", "└────┴────┘", "", "│ … │ …  │"], printed) == []
    assert unprinted_lines(["… export"], printed) == ["… export"]  # an elision mark only stands alone
    invented = "export                  runs/demo/bundle.tar (2.9 MB)"
    assert unprinted_lines([invented], printed) == [invented]
    assert unprinted_lines(real[::-1], printed) == real[::-1][1:]  # out of order
    assert unprinted_lines(["│ bundle │ runs/demo/bundle.tar.gz │"], printed) != []  # a changed word
    assert unprinted_lines(["undle runs/demo/bundle.ta"], printed) != []  # words cut in half
