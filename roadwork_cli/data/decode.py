"""The one decode + preprocess path: what ``cache-features``, ``evaluate --source`` and ``predict`` run on an input.

The guarantee is certified on scores computed from cached features, so the deployed model must see the pixels the
cache saw. Every consumer therefore goes through the same three steps, in this module only:

1. :func:`load_input` reads a path, parquet row locator, encoded bytes or ``PIL.Image`` into RGB. Large JPEGs are
   decoded at 1/2, 1/4 or 1/8 scale straight from the DCT (:func:`decode_jpeg_draft`) when that still covers the
   network input, which skips most of the decode cost; everything else goes through the validating
   :func:`~roadwork_cli.data.images.decode_image`.
2. :class:`ImageDataset` applies the eval transform (or, for an augmented cache view, the seeded train transform) and
   hands ``(H, W, 3)`` uint8 pixels out of the DataLoader workers (a quarter of the bytes of floats).
3. :func:`to_model_input` normalises a whole ``(B, H, W, 3)`` batch at once into the channels-last ``(B, 3, H, W)``
   float layout the backbone wants.

:class:`DecodeRecipe` names the choices that change pixels (draft decoding on/off and its target side, the
preprocessing); :func:`recipe_record` is the JSON form that the cache's ``meta.json`` and a bundle's ``model.json``
store, so ``predict`` can use what calibration used.

Example:
    >>> recipe = DecodeRecipe(preprocessing)  # doctest: +SKIP
    >>> loader = create_loader(ImageDataset(["a.jpg", "b.png"], recipe), batch_size=32)  # doctest: +SKIP
    >>> for indices, pixels, failed in loader:  # pixels: (B, H, W, 3) uint8, or None  # doctest: +SKIP
    ...     batch = to_model_input(pixels, recipe.preprocessing, device)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from roadwork_cli.data.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from PIL import Image

    from roadwork_cli.model.backbones import Preprocessing

__all__ = [
    "DecodeRecipe",
    "ImageDataset",
    "collate",
    "create_loader",
    "decode_jpeg_draft",
    "jpeg_draft_size",
    "load_input",
    "recipe_record",
    "to_model_input",
]

Failure = tuple[int, str]
"""``(input position, reason)`` of an input that could not be read."""


def jpeg_draft_size(preprocessing: Preprocessing) -> int:
    """Smallest shorter side the eval transform needs before its resize (size / crop_pct, rounded up)."""
    size = preprocessing.size
    side = max(size) if isinstance(size, tuple | list) else int(size)
    crop_pct = float(getattr(preprocessing, "crop_pct", 1.0) or 1.0)
    return int(math.ceil(side / min(crop_pct, 1.0)))


@dataclass(frozen=True)
class DecodeRecipe:
    """Everything that decides which pixels reach the backbone, plus the safety limits of reading.

    Attributes:
        preprocessing: The backbone's input recipe (size, mean, std, interpolation, crop_pct).
        jpeg_draft: Decode large JPEGs at reduced size from the DCT (see :func:`decode_jpeg_draft`).
        max_pixels: Decompression-bomb limit; larger images are rejected unread.
        max_file_bytes: Larger files are rejected unread.
    """

    preprocessing: Preprocessing
    jpeg_draft: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    @property
    def draft_side(self) -> int | None:
        """Target shorter side of draft decoding, or ``None`` when it is off."""
        return jpeg_draft_size(self.preprocessing) if self.jpeg_draft else None


def recipe_record(recipe: DecodeRecipe, compute_precision: str) -> dict[str, Any]:
    """JSON form of a recipe and the forward's precision, as ``meta.json`` and ``model.json`` store it."""
    return {
        "decode": {"jpeg_draft": recipe.jpeg_draft, "draft_side": recipe.draft_side},
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


class ImageDataset(Dataset):
    """Loads and transforms one input per item; a bad input becomes ``(index, None, reason)``, never an exception.

    Args:
        items: Inputs as :func:`load_input` takes them.
        recipe: How to decode and preprocess.
        seeds: Per item, ``None`` for the clean eval transform or a seed for one draw of ``augment`` (a cached
            augmented view); default all clean.
        augment: ``PIL.Image -> (H, W, 3) uint8`` random transform, drawn from torch's generator seeded per item.
    """

    def __init__(
        self,
        items: Sequence[Any],
        recipe: DecodeRecipe,
        seeds: Sequence[int | None] | None = None,
        augment: Callable[[Any], torch.Tensor] | None = None,
    ):
        from roadwork_cli.data.transforms import eval_transform

        self.items = items
        self.recipe = recipe
        self.seeds = seeds
        if seeds is not None and len(seeds) != len(items):
            raise ValueError("one seed (or None) per item")
        if seeds is not None and augment is None and any(s is not None for s in seeds):
            raise ValueError("seeded items need an augment transform")
        self.augment = augment
        self.clean = eval_transform(recipe.preprocessing, output="uint8")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_input(self.items[index], self.recipe)
            seed = None if self.seeds is None else self.seeds[index]
            if seed is None:
                return index, self.clean(image), None  # (H, W, 3) uint8
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return index, self.augment(image), None
        except Exception as exc:  # noqa: BLE001 - any failure of one input is reported for that input only
            return index, None, failure_reason(exc)


def collate(
    batch: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[Failure]]:
    """``(indices of good items, (B, H, W, 3) uint8 pixels or None, [(index, reason)] of bad ones)``."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, reason) for i, x, reason in batch if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None  # (B, H, W, 3)
    return [i for i, _ in good], pixels, failed


def create_loader(
    dataset: ImageDataset,
    batch_size: int | None = None,
    batch_sampler: Sequence[Sequence[int]] | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` in input order (``batch_size``, or the fixed batches of ``batch_sampler``).

    Worker processes are skipped when everything fits in one batch: there is nothing to overlap their start-up with.
    """
    n_batches = len(batch_sampler) if batch_sampler is not None else math.ceil(len(dataset) / max(batch_size or 1, 1))
    workers = 0 if n_batches <= 1 else max(0, min(workers, n_batches))
    return DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def to_model_input(
    pixels: torch.Tensor, preprocessing: Preprocessing, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> normalised ``(B, 3, H, W)`` float32 on ``device`` (channels-last unless told not)."""
    from roadwork_cli.data.transforms import normalize_batch

    batch = normalize_batch(pixels.to(device, non_blocking=True), preprocessing)  # channels-last strides
    return batch if channels_last else batch.contiguous()
