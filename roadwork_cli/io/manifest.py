"""Rows of a CSV / JSON-lines manifest, read the same way by ``roadwork split`` and ``roadwork predict``.

Knows columns and where the image file is, not what a label means: ``data/sources.py`` reads the label and group of
each row for ``split``, ``io/inputs.py`` only the image path for ``predict``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PATH_COLUMNS = ("path", "file", "filename", "image")
"""Columns that name the image, in order of preference."""


class ManifestColumnsError(ValueError):
    """A CSV manifest's header lacks a needed column (the message lists them); ``fields`` is its header."""

    def __init__(self, message: str, fields: list[str] | None):
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class ManifestRow:
    """One line of a manifest.

    Attributes:
        where: ``<manifest>:<line number>`` (CSV rows count from 2, after the header; JSON lines from 1).
        columns: The row's values by column name, names stripped and lower-cased; empty for a bad line.
        path: The image it names, absolute or relative to the manifest's folder; None when it names none.
        error: Why the line is not a row (a JSON line that is not an object), or None.
    """

    where: str
    columns: dict[str, Any]
    path: str | None
    error: str | None = None

    def text(self, column: str) -> str | None:
        """The stripped value of ``column`` (lower-case name), or None when missing or blank."""
        value = self.columns.get(column)
        return None if value is None or str(value).strip() == "" else str(value).strip()


def manifest_row(row: dict[Any, Any], base: Path, where: str) -> ManifestRow:
    """Parse one row (CSV dict or JSON object): normalise the column names and locate the image path."""
    columns = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    raw = next((str(columns[c]).strip() for c in PATH_COLUMNS if columns.get(c) not in (None, "")), "")
    path = None if not raw else raw if os.path.isabs(raw) else str(base / raw)
    return ManifestRow(where, columns, path)


def read_manifest(manifest: Path, name: str | None = None, required: tuple[str, ...] = ()) -> Iterator[ManifestRow]:
    """The rows of a ``.csv`` (header row) or JSON-lines manifest, in file order; blank JSON lines are skipped.

    Args:
        manifest: The file; paths in it are relative to its folder.
        name: How ``where`` names the file (default: ``str(manifest)``).
        required: Columns the CSV header must have besides a path column.

    Raises:
        ManifestColumnsError: A CSV header without a path column or one of ``required`` (raised before any row).
        OSError, UnicodeDecodeError, csv.Error: The file cannot be read.
    """
    name = str(manifest) if name is None else name
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        if manifest.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            fields = {str(f).strip().lower() for f in reader.fieldnames or []}
            if not fields & set(PATH_COLUMNS) or not set(required) <= fields:
                needed = ", ".join(["a path column (" + ", ".join(PATH_COLUMNS) + ")", *required])
                raise ManifestColumnsError(f"manifest {name} needs {needed}", reader.fieldnames)
            for number, row in enumerate(reader, start=2):
                yield manifest_row(row, manifest.parent, f"{name}:{number}")
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            row = _json_object(line)
            if row is None:
                yield ManifestRow(where, {}, None, "bad manifest line: not a JSON object")
            else:
                yield manifest_row(row, manifest.parent, where)


def _json_object(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
