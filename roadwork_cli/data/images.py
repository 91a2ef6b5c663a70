"""Safe image reading: every input either becomes an RGB ``PIL.Image`` or an :class:`ImageRejected` with a reason.

Locators are strings: a file path, or ``<file.parquet>#row=<i>`` for the image held in row ``i`` of a parquet file
(optionally ``#row=<i>&column=<name>`` when the image column is not auto-detectable). Nothing here imports torch.

The checks run in order of cost, so a hostile file is refused before it is decoded: size on disk, zero bytes,
format sniffing (text/HTML posing as an image), pixel count from the header (decompression bombs), then the full
decode (truncated or corrupt data), EXIF orientation and conversion of any mode to 8-bit RGB.

Example:
    >>> image = load_image("photo.jpg")  # doctest: +SKIP
    >>> image.mode
    'RGB'
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from roadwork_cli.errors import UsageError

# Truncated files must be rejected, not padded with grey: a half image could still carry a (wrong) label.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
"""Formats PIL may open (multi-picture JPEGs from phone cameras come through the JPEG opener as MPO)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif")
PARQUET_IMAGE_COLUMNS = ("image", "img", "bytes", "image_bytes", "jpg", "png")

_ROW_LOCATOR = re.compile(r"^(?P<path>.+?\.parquet)#row=(?P<row>\d+)(?:&column=(?P<column>[^&]+))?$", re.IGNORECASE)


class ImageRejected(UsageError):
    """An input that cannot be used as an image.

    Attributes:
        reason: Short human-readable reason, e.g. ``"truncated image"``; this is what ``rejected.jsonl`` records.
    """

    def __init__(self, reason: str, locator: str | None = None):
        self.reason = reason
        self.locator = locator
        super().__init__(f"{locator}: {reason}" if locator else reason)


def parse_locator(locator: str) -> tuple[str, int | None, str | None]:
    """Split a locator into ``(path, row, column)``; ``row`` is None for plain files.

    Example:
        >>> parse_locator("data/train.parquet#row=7")
        ('data/train.parquet', 7, None)
    """
    match = _ROW_LOCATOR.match(locator)
    if match is None:
        return locator, None, None
    return match["path"], int(match["row"]), match["column"]


def make_locator(path: str | os.PathLike[str], row: int, column: str | None = None) -> str:
    """The locator of row ``row`` of a parquet file (the column is only named when it is not auto-detectable)."""
    return f"{path}#row={row}" + (f"&column={column}" if column else "")


def _looks_like_text(data: bytes) -> bool:
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{", b"[")):
        return True
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return sum(ch.isprintable() or ch in "\r\n\t" for ch in text) / len(text) > 0.95


def _reject_unidentified(data: bytes) -> ImageRejected:
    if _looks_like_text(data):
        return ImageRejected("not an image (looks like HTML/text)")
    return ImageRejected("unreadable: not a JPEG/PNG/WebP/BMP/GIF image")


def _bomb_rejection(exc: Exception, max_pixels: int) -> ImageRejected:
    """PIL's own bomb error (its header check fires inside ``Image.open``) in our wording."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = match.group(1) if match else "?"
    return ImageRejected(f"too large: {pixels} pixels > {max_pixels}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; 16/32-bit integer data is scaled (not clipped), transparency goes onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image)
        if mode == "F":
            array = array.astype(np.float64)
            top = 1.0 if np.nanmax(array, initial=0.0) <= 1.0 else 255.0
            array = np.clip(np.nan_to_num(array) / top * 255.0, 0, 255)
        else:
            # 16-bit samples (I;16*, or "I" holding 16-bit PNG data) span 0..65535; 65535 -> 255 is a division by 257.
            array = np.clip(array.astype(np.int64), 0, 65535) / 257.0
        gray = Image.fromarray(np.round(array).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_file_bytes: int | None = None) -> Image.Image:
    """Decode image bytes fully and safely into an RGB image with EXIF orientation applied.

    Args:
        data: The encoded file's bytes.
        max_pixels: Decompression-bomb limit on width x height, checked from the header before decoding.
        max_file_bytes: Optional limit on ``len(data)``.

    Raises:
        ImageRejected: With a short reason ("zero bytes", "truncated image", "too large: ...", ...).
    """
    if len(data) == 0:
        raise ImageRejected("zero bytes")
    if max_file_bytes is not None and len(data) > max_file_bytes:
        raise ImageRejected(f"too large: {len(data)} bytes > {max_file_bytes}")
    try:
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that, from the header; our own limit is checked
        # right below, so its warning is redundant and its error becomes a rejection.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb_rejection(exc, max_pixels) from None
    except UnidentifiedImageError:
        raise _reject_unidentified(data) from None
    except Exception as exc:  # noqa: BLE001 - header parsers raise many kinds (SyntaxError, struct.error, ...)
        raise ImageRejected(f"unreadable: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected(f"unreadable: empty image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(f"too large: {width}x{height} pixels > {max_pixels}")
    try:
        image.load()  # the full decode: truncated or corrupt data fails here
    except OSError as exc:
        message = str(exc)
        if "truncated" in message.lower() or "broken data stream" in message.lower():
            raise ImageRejected("truncated image") from None
        raise ImageRejected(f"unreadable: {message}") from None
    except Image.DecompressionBombError as exc:
        raise _bomb_rejection(exc, max_pixels) from None
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not abort a batch
        raise ImageRejected(f"unreadable: {type(exc).__name__}: {exc}") from None
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored rather than dropping the image
        oriented = image
    try:
        return _to_rgb(oriented if oriented is not None else image)
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(f"unreadable: cannot convert mode {image.mode} to RGB ({exc})") from None


class _RowGroupCache:
    """The last few decoded parquet row groups, so sequential ``#row=`` reads don't re-read a group per row."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[tuple, tuple[int, list]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_ROW_GROUPS = _RowGroupCache()


def detect_image_column(schema, preferred: str | None = None) -> str:
    """The column of a parquet ``schema`` that holds images.

    Args:
        schema: A ``pyarrow.Schema``.
        preferred: Column name from the settings; used as is when given.

    Raises:
        UsageError: ``preferred`` is missing, or no column looks like image bytes.
    """
    import pyarrow as pa

    names = list(schema.names)
    if preferred:
        if preferred not in names:
            raise UsageError(f"parquet image column {preferred!r} not found; columns are {names}")
        return preferred

    def holds_bytes(field) -> bool:
        kind = field.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return True
        return pa.types.is_struct(kind) and any(kind.field(i).name == "bytes" for i in range(kind.num_fields))

    lowered = {name.lower(): name for name in names}
    for candidate in PARQUET_IMAGE_COLUMNS:
        if candidate in lowered and holds_bytes(schema.field(lowered[candidate])):
            return lowered[candidate]
    for field in schema:
        if holds_bytes(field):
            return field.name
    raise UsageError(f"no image-bytes column found in parquet columns {names}; set data.parquet_image_column")


def image_cell_bytes(value, base_dir: str | os.PathLike[str] | None = None) -> bytes:
    """Bytes of one parquet image cell: raw bytes, or a ``{"bytes": ..., "path": ...}`` struct (HF datasets style).

    Raises:
        ImageRejected: The cell is empty.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            path = Path(value["path"])
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            return read_bytes(str(path))
    if value is None:
        raise ImageRejected("zero bytes")
    raise ImageRejected(f"unreadable: parquet image cell of type {type(value).__name__}")


def _read_parquet_row(path: str, row: int, column: str | None, max_file_bytes: int | None) -> bytes:
    import pyarrow.parquet as pq

    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ImageRejected(f"unreadable: {exc.strerror or exc}") from None
    try:
        parquet = pq.ParquetFile(path)
        name = detect_image_column(parquet.schema_arrow, column)
        meta = parquet.metadata
        start = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if row < start + rows:
                key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size, name, group)
                cached = _ROW_GROUPS.get(key)
                if cached is None:
                    cached = parquet.read_row_group(group, columns=[name]).column(name).to_pylist()
                    _ROW_GROUPS.put(key, cached)
                value = cached[row - start]
                break
            start += rows
        else:
            raise ImageRejected(f"unreadable: row {row} out of range (file has {meta.num_rows} rows)")
    except (ImageRejected, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt parquet file is bad input, not a crash
        raise ImageRejected(f"unreadable: {type(exc).__name__}: {exc}") from None
    data = image_cell_bytes(value, base_dir=os.path.dirname(path))
    if max_file_bytes is not None and len(data) > max_file_bytes:
        raise ImageRejected(f"too large: {len(data)} bytes > {max_file_bytes}")
    return data


def read_bytes(locator: str, max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The encoded bytes behind a locator (file path or ``<file.parquet>#row=<i>``).

    Raises:
        ImageRejected: Missing or unreadable file, or larger than ``max_file_bytes`` (checked before reading).
    """
    path, row, column = parse_locator(str(locator))
    if row is not None:
        return _read_parquet_row(path, row, column, max_file_bytes)
    try:
        size = os.stat(path).st_size
        if max_file_bytes is not None and size > max_file_bytes:
            raise ImageRejected(f"too large: {size} bytes > {max_file_bytes}")
        with open(path, "rb") as handle:
            return handle.read()
    except ImageRejected:
        raise
    except FileNotFoundError:
        raise ImageRejected("unreadable: file not found") from None
    except OSError as exc:
        raise ImageRejected(f"unreadable: {exc.strerror or exc}") from None


def load_image(
    locator: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
) -> Image.Image:
    """Read and decode the image behind ``locator`` into RGB (EXIF-transposed).

    Raises:
        ImageRejected: With ``.reason`` and ``.locator`` set.
    """
    try:
        return decode_image(read_bytes(locator, max_file_bytes), max_pixels)
    except ImageRejected as exc:
        raise ImageRejected(exc.reason, locator) from None
