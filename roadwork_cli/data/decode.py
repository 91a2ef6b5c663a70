"""The one decode + preprocess path: what ``cache-features``, ``evaluate --source`` and ``predict`` run on an input.

The guarantee is certified on scores computed from cached features, so the deployed model must see the pixels the
cache saw. Every consumer therefore goes through the same three steps, here and in :mod:`roadwork_cli.data.pixels`
(the torch-free half, which the ONNX runtime path uses on its own and whose pixels are tested equal to these):

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

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from roadwork_cli.data.pixels import (
    DecodeRecipe,
    Failure,
    decode_jpeg_draft,
    failure_reason,
    jpeg_draft_size,
    load_input,
    recipe_record,
)

if TYPE_CHECKING:
    from roadwork_cli.data.preprocessing import Preprocessing

__all__ = [
    "DecodeRecipe",
    "ImageDataset",
    "collate",
    "create_loader",
    "decode_jpeg_draft",
    "failure_reason",
    "jpeg_draft_size",
    "load_input",
    "recipe_record",
    "to_model_input",
]


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
