"""The torch-free half of the one decode path: input -> RGB -> eval resize and centre crop -> uint8 pixels.

:mod:`roadwork_cli.data.decode` builds the DataLoader path of ``cache-features``, ``evaluate --source`` and the
PyTorch ``predict`` on these functions; the ONNX runtime path (``predict`` without torch) uses them directly:

1. :func:`load_input` reads a path, parquet row locator, encoded bytes or ``PIL.Image`` into RGB, drafting large JPEGs
   from the DCT (:func:`decode_jpeg_draft`) when :class:`DecodeRecipe` says so.
2. :func:`eval_pixels` is torchvision's ``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)`` on a PIL image,
   re-done with PIL alone: the same output size arithmetic, the same PIL filter, the same crop offsets (Python's
   ``round``, half to even) and the same zero padding, hence the same ``(size, size, 3)`` uint8 pixels.
3. :func:`normalize_pixels` is :func:`~roadwork_cli.data.transforms.normalize_batch` in numpy: the same float32
   operations in the same order, so the network input is equal, not merely close.

Example:
    >>> recipe = DecodeRecipe(preprocessing)  # doctest: +SKIP
    >>> for indices, pixels, failed in iter_pixel_batches(["a.jpg", "b.png"], recipe, batch_size=32):  # doctest: +SKIP
    ...     batch = normalize_pixels(pixels, recipe.preprocessing)  # (B, 3, S, S) float32  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from roadwork_cli.data.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from PIL import Image

    from roadwork_cli.data.preprocessing import Preprocessing

__all__ = [
    "DecodeRecipe",
    "PixelBatch",
    "decode_jpeg_draft",
    "eval_pixels",
    "failure_reason",
    "iter_pixel_batches",
    "jpeg_draft_size",
    "load_input",
    "normalize_pixels",
    "read_pixels",
    "stack_pixels",
    "reason_kind",
    "recipe_record",
]

Failure = tuple[int, str]
"""``(input position, reason)`` of an input that could not be read."""

PixelBatch = tuple[list[int], "np.ndarray | None", list[Failure]]
"""``(indices of good inputs, (B, S, S, 3) uint8 pixels or None, [(index, reason)] of bad ones)``."""

# torchvision's InterpolationMode value -> PIL filter number (torchvision's pil_modes_mapping); an unknown name falls
# back to bicubic, as the torch eval transform does.
_PIL_FILTERS = {
    "nearest": 0,
    "nearest-exact": 0,
    "lanczos": 1,
    "bilinear": 2,
    "bicubic": 3,
    "box": 4,
    "hamming": 5,
}


def jpeg_draft_size(preprocessing: Preprocessing) -> int:
    """Smallest shorter side the eval transform needs before its resize (size / crop_pct, rounded up)."""
    return int(math.ceil(int(preprocessing.size) / min(float(preprocessing.crop_pct), 1.0)))


@dataclass(frozen=True)
class DecodeRecipe:
    """Everything that decides which pixels reach the backbone, plus the safety limits of reading.

    Attributes:
        preprocessing: The backbone's input recipe (size, mean, std, interpolation, crop_pct).
        jpeg_draft: Decode large JPEGs at reduced size from the DCT (see :func:`decode_jpeg_draft`).
        max_pixels: Decompression-bomb limit; larger images are rejected unread.
        max_file_bytes: Larger files are rejected unread.
        decoder: ``pil`` (DataLoader workers; the reference pixels) or ``cuda`` (JPEG batches decoded on the GPU,
            equal to ``pil`` within :data:`roadwork_cli.data.decode.CUDA_DECODE_TOLERANCE`).
    """

    preprocessing: Preprocessing
    jpeg_draft: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    decoder: str = "pil"

    @property
    def draft_side(self) -> int | None:
        """Target shorter side of draft decoding, or ``None`` when it is off."""
        return jpeg_draft_size(self.preprocessing) if self.jpeg_draft else None


def recipe_record(recipe: DecodeRecipe, compute_precision: str) -> dict[str, Any]:
    """JSON form of a recipe and the forward's precision, as ``meta.json`` and ``model.json`` store it.

    The decoder is named only when it is not the default ``pil``, so records (and the training signatures built on
    them) of the PIL path stay what they were.
    """
    decode: dict[str, Any] = {"jpeg_draft": recipe.jpeg_draft, "draft_side": recipe.draft_side}
    if recipe.decoder != "pil":
        decode["decoder"] = recipe.decoder
    return {
        "decode": decode,
        "preprocessing": recipe.preprocessing.to_dict(),
        "pixels": "uint8 eval transform, normalised per batch",
        "compute_precision": compute_precision,
    }


def decode_jpeg_draft(data: bytes, max_pixels: int, draft_side: int) -> Image.Image | None:
    """Decode a large JPEG at 1/2, 1/4 or 1/8 scale straight from the DCT when that still covers ``draft_side``.

    JPEG decoding dominates CPU inference cost and libjpeg's DCT scaling skips most of it. PIL only picks a scale
    whose result is at least the requested size in both dimensions, so the eval transform's resize never upsamples.
    Anything that is not a plain, complete JPEG, or is below twice ``draft_side`` (no DCT scale applies), returns
    ``None`` and goes through the validating ``decode_image``, which reports the reason.
    """
    from PIL import Image, ImageOps

    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        width, height = image.size
        if width * height > max_pixels or min(width, height) < 2 * draft_side:
            return None  # too large: let the validator reject it; too small: no DCT scale applies
        image.draft("RGB", (draft_side, draft_side))
        image.load()
        oriented = ImageOps.exif_transpose(image)
        return oriented if oriented.mode == "RGB" else oriented.convert("RGB")
    except Exception:  # noqa: BLE001 - fall back to the validating decoder, which names the problem
        return None


def load_input(item: Any, recipe: DecodeRecipe) -> Image.Image:
    """Read one input (path or row locator, encoded bytes, or ``PIL.Image``) as an RGB image.

    Raises:
        ImageRejected: Unreadable, too large, truncated or not an image, with the reason.
    """
    from PIL import Image

    from roadwork_cli.data.images import ImageRejected, decode_image, read_bytes

    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, bytes | bytearray | memoryview):
        data = bytes(item)  # an encoded image already in memory (e.g. piped to `roadwork predict -`)
        if len(data) > recipe.max_file_bytes:
            raise ImageRejected(f"too large: {len(data)} bytes > {recipe.max_file_bytes}")
    else:
        data = read_bytes(os.fspath(item), recipe.max_file_bytes)
    side = recipe.draft_side
    if side is not None:
        drafted = decode_jpeg_draft(data, recipe.max_pixels, side)
        if drafted is not None:
            return drafted
    return decode_image(data, recipe.max_pixels)


def failure_reason(exc: BaseException) -> str:
    """Short reason of a failed input: ``ImageRejected.reason`` without the locator, else the message."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    message = str(exc).strip()
    return f"unreadable: {type(exc).__name__}: {message}" if message else f"unreadable: {type(exc).__name__}"


def reason_kind(reason: str) -> str:
    """The reason without its details, for summary counts ("unreadable: ..." -> "unreadable")."""
    for sep in (":", " ("):
        if sep in reason:
            return reason.split(sep, 1)[0]
    return reason


def eval_pixels(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """``(S, S, 3)`` uint8 pixels of the eval transform (resize the shorter side, centre-crop), without torch.

    Equal to ``eval_transform(preprocessing, output="uint8")(image)`` of :mod:`roadwork_cli.data.transforms`: the
    resize target is computed as torchvision computes it (``int(short_target * long / short)``, no resize when the
    size already matches), filtered by the same PIL filter, and the crop offsets round half to even as
    ``int(round(...))`` does.
    """
    from PIL import ImageOps

    size = int(preprocessing.size)
    target = int(math.floor(size / max(preprocessing.crop_pct, 1e-6)))
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target, int(target * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)  # (W, H)
    if new_size != (width, height):
        resample = _PIL_FILTERS.get(str(preprocessing.interpolation).lower(), _PIL_FILTERS["bicubic"])
        image = image.resize(new_size, resample)
    width, height = image.size
    if size > width or size > height:  # crop_pct > 1: zero borders, split as torchvision splits them
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        image = ImageOps.expand(image, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill=0)
        width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    if (width, height) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # (S, S, 3)


def normalize_pixels(pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 -> normalised ``(B, 3, H, W)`` float32 (C-contiguous), as ``normalize_batch`` does."""
    mean = np.asarray(preprocessing.mean, dtype=np.float32) * np.float32(255.0)  # (3,)
    std = np.asarray(preprocessing.std, dtype=np.float32) * np.float32(255.0)  # (3,)
    batch = pixels.astype(np.float32)  # (B, H, W, 3)
    batch -= mean
    batch /= std
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # (B, 3, H, W)


def read_pixels(item: Any, recipe: DecodeRecipe) -> tuple[np.ndarray | None, str | None]:
    """``(pixels, None)`` of one input, or ``(None, reason)`` when it cannot be read: never an exception."""
    try:
        return eval_pixels(load_input(item, recipe), recipe.preprocessing), None
    except Exception as exc:  # noqa: BLE001 - any failure of one input is reported for that input only
        return None, failure_reason(exc)


def stack_pixels(indices: Sequence[int], results: Sequence[tuple[np.ndarray | None, str | None]]) -> PixelBatch:
    """One batch of :func:`read_pixels` results (``results[k]`` is input ``indices[k]``'s), good and bad apart."""
    good = [(i, x) for i, (x, _) in zip(indices, results, strict=True) if x is not None]
    failed = [(i, str(reason)) for i, (x, reason) in zip(indices, results, strict=True) if x is None]
    pixels = np.stack([x for _, x in good]) if good else None  # (B, S, S, 3)
    return [i for i, _ in good], pixels, failed


def iter_pixel_batches(
    items: Sequence[Any], recipe: DecodeRecipe, batch_size: int = 32, workers: int = 0
) -> Iterator[PixelBatch]:
    """Eval pixels of ``items`` in input order, ``batch_size`` inputs at a time (the DataLoader's batches).

    With ``workers`` > 0 a thread pool decodes (PIL releases the GIL while decoding and resizing) and keeps the next
    two batches in flight while the caller runs the current one; memory stays bounded by those batches.
    """
    chunks = [list(range(start, min(start + batch_size, len(items)))) for start in range(0, len(items), batch_size)]
    if workers <= 0 or len(chunks) <= 1:
        for chunk in chunks:
            yield stack_pixels(chunk, [read_pixels(items[i], recipe) for i in chunk])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roadwork-decode") as pool:
        pending: deque[tuple[list[int], list[Any]]] = deque()
        upcoming = iter(chunks)

        def submit() -> None:
            chunk = next(upcoming, None)
            if chunk is not None:
                pending.append((chunk, [pool.submit(read_pixels, items[i], recipe) for i in chunk]))

        for _ in range(3):
            submit()
        while pending:
            chunk, futures = pending.popleft()
            submit()
            yield stack_pixels(chunk, [future.result() for future in futures])
