"""Stale-artifact detection: each stage records fingerprints of the files it read; a later stage refuses if they moved.

A run is a chain of artifacts (splits -> features -> checkpoint and scores -> calibration). Re-running an early stage
(say ``split`` with more images) without re-running the ones after it leaves later artifacts that describe other data.
``record`` stores, per stage, a short sha256 of every input file it read; ``check`` compares them with the files on disk
now and names the command that brings the run back in step. Runs written before provenance existed have no record and
pass unchanged.

Example:
    >>> record(run, "train", [run.splits, run.current_features])   # at the end of train
    >>> check(run, "train", command="train")                                # at the start of calibrate
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_write_json, read_json
from roadwork_cli.io.run import RunDir

FINGERPRINT_HEX = 16
_MISSING = "missing"


class StaleError(UsageError):
    """An artifact was made from inputs that changed since (exit 2: the run must be brought up to date)."""


def fingerprint(path: Path) -> str:
    """First 16 hex digits of the file's sha256 (64 bits: a collision by chance is not a practical concern)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:FINGERPRINT_HEX]


def _relative(run: RunDir, path: Path) -> str:
    """Key a file by its path inside the run, so a run folder that is moved or copied keeps its provenance."""
    path = Path(path)
    try:
        return path.resolve().relative_to(run.root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _load(run: RunDir) -> dict[str, dict[str, str]]:
    if not run.provenance.exists():
        return {}
    data = read_json(run.provenance)
    return data.get("stages", {}) if isinstance(data, dict) else {}


def record(run: RunDir, stage: str, inputs: Iterable[Path]) -> None:
    """Store the fingerprint of each input file under ``stage`` in ``<run>/provenance.json`` (atomically).

    Args:
        run: The run directory.
        stage: The stage that read the inputs, as its command is spelled (``"train"``).
        inputs: Files the stage read; absolute or relative to the current folder.
    """
    stages = _load(run)
    stages[stage] = {_relative(run, Path(path)): fingerprint(Path(path)) for path in inputs}
    atomic_write_json(run.provenance, {"version": 1, "stages": stages})


def _resolve(run: RunDir, key: str) -> Path:
    path = Path(key)
    return path if path.is_absolute() else run.root / path


def check(run: RunDir, stage: str, command: str) -> None:
    """Refuse to go on when a file that ``stage`` read has changed or vanished since it ran.

    Args:
        run: The run directory.
        stage: The earlier stage whose record is checked (``"calibrate"`` before evaluate).
        command: The command that brings the run up to date, usually ``stage`` itself.

    Raises:
        StaleError: An input changed or vanished; the message names the file and the command to run.
    """
    recorded = _load(run).get(stage)
    if not recorded:
        return  # a run written before provenance existed: nothing to compare with
    for key, expected in sorted(recorded.items()):
        path = _resolve(run, key)
        now = fingerprint(path) if path.is_file() else _MISSING
        if now != expected:
            what = "was removed" if now == _MISSING else "changed"
            raise StaleError(
                f"{key} {what} after `roadwork {stage}` ran, so the artifacts that stage made describe other data. "
                f"Run `roadwork {command} --run {run.root}` (and the stages after it) to bring the run up to date."
            )
