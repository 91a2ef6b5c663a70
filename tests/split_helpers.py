"""``splits.json`` for tests, written in the contract's format (docs/architecture.md) from one place.

Tests that need a run with known splits write the file here rather than spelling out its keys, so a change of the
format is made once. Samples stay plain dicts (``path``, ``label``, ``source``, ``group``), as in the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from roadwork_cli.data.splits import SPLITS_VERSION
from roadwork_cli.io.atomic import atomic_write_json, read_json
from roadwork_cli.io.run import RunDir


def splits_path(target: RunDir | Path) -> Path:
    """The splits file of a run, or ``target`` itself when it is a path."""
    return target.splits if isinstance(target, RunDir) else Path(target)


def splits_table(splits: dict[str, list[str]], samples: dict[str, dict], seed: int = 0) -> dict:
    """The content of ``splits.json``: ids per split and one entry per sample id."""
    return {"version": SPLITS_VERSION, "seed": seed, "splits": splits, "samples": samples}


def write_splits(target: RunDir | Path, splits: dict[str, list[str]], samples: dict[str, dict], seed: int = 0) -> dict:
    """Write ``splits.json`` (atomically) into a run or at a path; returns the table written."""
    table = splits_table(splits, samples, seed)
    atomic_write_json(splits_path(target), table)
    return table


@contextmanager
def edited_splits(target: RunDir | Path) -> Iterator[dict]:
    """Read ``splits.json``, let the caller change the table in place, and write it back on leaving the block."""
    path = splits_path(target)
    table = read_json(path)
    yield table
    atomic_write_json(path, table)
