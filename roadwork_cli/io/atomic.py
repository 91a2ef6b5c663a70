"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

A reader (or a resumed run after SIGKILL) therefore sees either the old file or the complete new one, never a torn
write.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    """The process umask, read from /proc where it can be, because the portable way briefly changes it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    Use it for writers that insist on a file name (safetensors, matplotlib, tarfile).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    # mkstemp creates 0600 whatever the umask; give the file the mode a plain open() would, so bundles and reports
    # can be shared and served.
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write(path: str | os.PathLike[str], mode: str, write: Callable[[IO[Any]], None]) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding, newline=None if encoding is None else "\n") as handle:
            write(handle)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic_write(path, "wb", lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return _atomic_write(path, "w", lambda handle: handle.write(text))


def dumps_json(obj: Any) -> str:
    """Stable JSON (sorted keys, 2-space indent, trailing newline) so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def json_safe(value: Any, printable: bool = False) -> Any:
    """``value`` with NaN/inf turned into None and numpy scalars into Python ones, recursively through dicts/lists.

    JSON has no NaN; None ("not defined here", e.g. an AUROC on one class) is what readers of our files expect.

    Args:
        value: Data to write.
        printable: Also turn what the ``--json`` summaries hold into JSON (dataclasses and sets, arrays, keys and
            anything else as strings); artifacts leave it off, so an unexpected object fails loudly.
    """
    if printable and dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {(str(key) if printable else key): json_safe(item, printable) for key, item in value.items()}
    if printable and isinstance(value, set | frozenset):
        value = sorted(value, key=str)
    if isinstance(value, list | tuple):
        return [json_safe(item, printable) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy / torch scalar, 0-d array
    elif printable and hasattr(value, "tolist"):
        return json_safe(value.tolist(), printable)
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return None
    if printable and not (value is None or isinstance(value, bool | int | float | str)):
        return str(value)  # paths, enums and anything else printable
    return value


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as stable JSON atomically."""
    return atomic_write_text(path, dumps_json(obj))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
