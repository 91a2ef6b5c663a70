"""Inputs and outputs of ``roadwork predict``: expanding files, folders, globs and stdin; record formats.

Knows file names and magic bytes, not models or decoded images, so it stays torch-free.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif")
FIELDS = ("path", "p_roadwork", "gate", "decision", "error")
FORMATS = ("table", "jsonl", "csv")
_GLOB_CHARS = set("*?[")


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
STDIN_IMAGE = "<stdin>"


def looks_like_image(data: bytes) -> bool:
    """Whether ``data`` starts like an encoded image (JPEG, PNG, GIF, BMP, WebP) rather than a list of paths."""
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def expand_inputs(
    inputs: Iterable[str], stdin: BinaryIO | None = None
) -> list[tuple[str, str | bytes | None, str | None]]:
    """Turn INPUT arguments into ``(shown path, item, error)`` triples, in the order given.

    Folders expand to their image files (recursive, sorted, hidden entries skipped); globs expand to their matches
    (sorted); ``-`` reads stdin: either one encoded image (its bytes become the item, shown as ``<stdin>``) or one
    path per line. A glob or folder that yields nothing becomes one error entry, so that it is reported rather than
    silently dropped. Plain paths pass through even when missing: the loader reports them.
    """
    expanded: list[tuple[str, str | bytes | None, str | None]] = []
    for raw in inputs:
        if raw == "-":
            stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
            data = stream.read()
            data = data.encode("utf-8") if isinstance(data, str) else data
            if looks_like_image(data):
                expanded.append((STDIN_IMAGE, data, None))
                continue
            lines = [line.strip() for line in data.decode("utf-8", errors="replace").splitlines()]
            expanded.extend(expand_inputs([line for line in lines if line and line != "-"]))
            continue
        path = Path(raw)
        if path.is_dir():
            files = _image_files(path)
            expanded.extend((str(f), str(f), None) for f in files)
            if not files:
                expanded.append((raw, None, "folder holds no image files"))
        elif not path.exists() and _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            for match in matches:
                if Path(match).is_dir():
                    expanded.extend((str(f), str(f), None) for f in _image_files(Path(match)))
                else:
                    expanded.append((match, match, None))
            if not matches:
                expanded.append((raw, None, "no file matches this pattern"))
        else:
            expanded.append((raw, raw, None))
    return expanded


def _image_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            Path(root) / name for name in files if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
        )
    return sorted(found)


def round_score(value: float | None) -> float | None:
    """A score rounded to 6 decimals for output (``None`` stays ``None``)."""
    return None if value is None else round(float(value), 6)


def records_to_text(records: list[dict[str, Any]], fmt: str) -> str:
    """Render records as ``jsonl`` (one object per line) or ``csv`` (header + one row per record)."""
    if fmt == "jsonl":
        return "".join(json.dumps({k: r[k] for k in FIELDS}, ensure_ascii=False) + "\n" for r in records)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(FIELDS)
        for r in records:
            writer.writerow(["" if r[k] is None else r[k] for k in FIELDS])
        return buffer.getvalue()
    raise ValueError(f"unknown format {fmt!r}")
