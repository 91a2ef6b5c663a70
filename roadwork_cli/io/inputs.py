"""Inputs and outputs of ``roadwork predict``: expanding files, folders, globs, manifests, parquet and stdin; record
formats and a streaming record writer.

Knows file names, manifest columns and magic bytes, not models or decoded images, so it stays torch-free.
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
from typing import Any, BinaryIO, TextIO

from roadwork_cli.io.manifest import PATH_COLUMNS, ManifestColumnsError, read_manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif")
FIELDS = ("path", "p_roadwork", "gate", "decision", "error")
FORMATS = ("table", "jsonl", "csv")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
PARTIAL_SUFFIX = ".partial"
_GLOB_CHARS = set("*?[")


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
STDIN_IMAGE = "<stdin>"


def looks_like_image(data: bytes) -> bool:
    """Whether ``data`` starts like an encoded image (JPEG, PNG, GIF, BMP, WebP) rather than a list of paths."""
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def expand_inputs(
    inputs: Iterable[str], stdin: BinaryIO | None = None, skipped: list[str] | None = None
) -> list[tuple[str, str | bytes | None, str | None]]:
    """Turn INPUT arguments into ``(shown path, item, error)`` triples, in the order given.

    Folders expand to their image files (recursive, sorted, hidden entries skipped); globs expand to their matches
    (sorted); ``-`` reads stdin: either one encoded image (its bytes become the item, shown as ``<stdin>``) or one
    path per line. A ``.csv``/``.jsonl`` manifest expands to the images of its ``path`` column (relative to the
    manifest; labels and other columns are ignored), a ``.parquet`` file to one ``file.parquet#row=N`` locator per
    row. A glob, folder or manifest that yields nothing becomes one error entry, so that it is reported rather than
    silently dropped. Plain paths pass through even when missing: the loader reports them.

    Args:
        inputs: The INPUT arguments.
        stdin: Stream read for ``-`` (default: the process's stdin).
        skipped: When given, receives the non-image files found in folders (they are not predicted on).
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
            expanded.extend(expand_inputs([line for line in lines if line and line != "-"], skipped=skipped))
            continue
        path = Path(raw)
        suffix = path.suffix.lower()
        if path.is_file() and suffix in MANIFEST_SUFFIXES:
            expanded.extend(_manifest_entries(path))
        elif path.is_file() and suffix == ".parquet":
            expanded.extend(_parquet_entries(path))
        elif path.is_dir():
            files = _image_files(path, skipped)
            expanded.extend((str(f), str(f), None) for f in files)
            if not files:
                expanded.append((raw, None, "folder holds no image files"))
        elif not path.exists() and _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            for match in matches:
                if Path(match).is_dir():
                    expanded.extend((str(f), str(f), None) for f in _image_files(Path(match), skipped))
                else:
                    expanded.append((match, match, None))
            if not matches:
                expanded.append((raw, None, "no file matches this pattern"))
        else:
            expanded.append((raw, raw, None))
    return expanded


def _image_files(folder: Path, skipped: list[str] | None = None) -> list[Path]:
    found, others = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                (found if name.lower().endswith(IMAGE_SUFFIXES) else others).append(Path(root) / name)
    if skipped is not None:
        skipped.extend(str(f) for f in sorted(others))
    return sorted(found)


Entry = tuple[str, str | bytes | None, str | None]


def _manifest_entries(manifest: Path) -> list[Entry]:
    """The images a CSV/JSONL manifest names; a row without a path is an error entry named ``manifest:line``."""
    entries: list[Entry] = []
    try:
        for row in read_manifest(manifest):
            if row.error is not None or row.path is None:
                entries.append((row.where, None, row.error or "manifest row without a path"))
            else:
                entries.append((row.path, row.path, None))
    except ManifestColumnsError:
        return [(str(manifest), None, f"manifest has no path column ({', '.join(PATH_COLUMNS)})")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [(str(manifest), None, f"unreadable manifest: {exc}")]
    return entries or [(str(manifest), None, "manifest lists no images")]


def _parquet_entries(file: Path) -> list[Entry]:
    """One ``file.parquet#row=N`` locator per row (the decoder finds the image column); a bad file is one error."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means: this input cannot be read
        return [(str(file), None, f"unreadable parquet file: {type(exc).__name__}: {exc}")]
    if rows == 0:
        return [(str(file), None, "parquet file has no rows")]
    return [(f"{file}#row={row}", f"{file}#row={row}", None) for row in range(rows)]


def round_score(value: float | None) -> float | None:
    """A score rounded to 6 decimals for output (``None`` stays ``None``)."""
    return None if value is None else round(float(value), 6)


def _record_line(record: dict[str, Any], fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps({k: record[k] for k in FIELDS}, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return _csv_line(["" if record[k] is None else record[k] for k in FIELDS])
    if fmt == "probability":
        return "nan\n" if record["p_roadwork"] is None else f"{record['p_roadwork']:.6f}\n"
    raise ValueError(f"unknown format {fmt!r}")


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


class RecordWriter:
    """Writes records one by one as they are computed, flushed each time, to stdout or to a file.

    A file is written as ``<out>.partial`` and renamed to ``<out>`` by :meth:`finish`, so ``<out>`` only ever holds a
    complete result, while an interrupted run keeps every record done so far in ``<out>.partial`` (see
    :meth:`abort`). The partial file is opened like any plain file, so its mode follows the umask.

    Args:
        fmt: ``jsonl``, ``csv`` or ``probability`` (one calibrated p per line).
        out: Destination file; ``None`` writes to ``stream``.
        stream: Text stream for ``out=None`` (default ``sys.stdout``).
    """

    def __init__(self, fmt: str, out: str | os.PathLike[str] | None = None, stream: TextIO | None = None):
        _record_line({k: None for k in FIELDS}, fmt)  # unknown formats fail before anything is written
        self.fmt = fmt
        self.out = Path(out) if out is not None else None
        self.written = 0
        if self.out is None:
            self._handle = stream if stream is not None else sys.stdout
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.partial_path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - kept open
        if fmt == "csv":
            self._put(_csv_line(list(FIELDS)))

    @property
    def partial_path(self) -> Path | None:
        """Where records go until :meth:`finish` (``None`` for a stream)."""
        return None if self.out is None else self.out.with_name(self.out.name + PARTIAL_SUFFIX)

    @property
    def where(self) -> str:
        """The destination in words, for messages."""
        return "stdout" if self.out is None else str(self.out)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it, so readers (a pipe, ``tail -f``) see it at once."""
        self._put(_record_line(record, self.fmt))
        self.written += 1

    def _put(self, text: str) -> None:
        self._handle.write(text)
        self._handle.flush()

    def finish(self) -> None:
        """Make the output complete: a file is synced and renamed from ``<out>.partial`` to ``<out>``."""
        if self.out is None:
            return
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.partial_path, self.out)

    def abort(self) -> str:
        """Stop after an interruption, keeping what was written; returns where it is (for the message)."""
        if self.out is None:
            return "stdout"
        self._handle.close()
        return str(self.partial_path)
