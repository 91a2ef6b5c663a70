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

import io
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
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
    "CUDA_DECODE_TOLERANCE",
    "DECODERS",
    "DecodeRecipe",
    "GpuDecodeLoader",
    "check_decoder",
    "ImageDataset",
    "collate",
    "create_loader",
    "decode_jpeg_draft",
    "decode_jpegs",
    "draft_scale",
    "failure_reason",
    "jpeg_draft_size",
    "jpeg_orientation",
    "load_input",
    "orient",
    "recipe_record",
    "resize_crop",
    "to_model_input",
]


_SEEDED = threading.Lock()
"""Held while an augmented view is drawn from torch's global generator, so decode threads cannot interleave draws."""


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
            with _SEEDED, torch.random.fork_rng(devices=[]):  # one seeded draw at a time: the generator is global
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
) -> DataLoader | GpuDecodeLoader:
    """A DataLoader over ``dataset`` in input order (``batch_size``, or the fixed batches of ``batch_sampler``).

    Worker processes are skipped when everything fits in one batch: there is nothing to overlap their start-up with.
    A recipe with ``decoder="cuda"`` gets a :class:`GpuDecodeLoader` (same batches, pixels already on the GPU).
    """
    if getattr(dataset.recipe, "decoder", "pil") == "cuda":
        check_decoder("cuda")
        if batch_sampler is None:
            step = max(batch_size or 1, 1)
            batch_sampler = [range(s, min(s + step, len(dataset))) for s in range(0, len(dataset), step)]
        return GpuDecodeLoader(dataset, batch_sampler, workers, torch.device("cuda", torch.cuda.current_device()))
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


# ------------------------------------------------------------------------------------------- GPU JPEG decoding

DECODERS = ("pil", "cuda")
"""``data.decoder`` values: ``pil`` decodes in the DataLoader workers (the reference pixels); ``cuda`` decodes
batches of JPEG bytes on the GPU with nvjpeg (``torchvision.io.decode_jpeg(device="cuda")``)."""

CUDA_DECODE_TOLERANCE = {"mean_abs": 2.0, "p99_abs": 20}
"""How far ``data.decoder: cuda`` pixels may be from the ``pil`` decoder's, per ``(S, S, 3)`` uint8 image: mean
absolute difference in grey levels, and 99th percentile of the absolute difference. The GPU path decodes the full
image and reduces it as draft decoding would (:func:`draft_scale`: block averages where libjpeg scales its IDCT), then
resizes with torch's antialiased filter where PIL uses its own; nvjpeg's IDCT and chroma upsampling add a grey level
or so. With torchvision's CPU decoder in place of nvjpeg, sharp-edged test scenes came within mean 0.11 / p99 1 of
PIL without draft decoding and mean 1.4 / p99 11 with it. tests/data/test_cuda_decode.py checks the bound with
nvjpeg on CUDA hosts and with libjpeg everywhere; cached features carry the decoder in their fingerprint, so the two
are never mixed."""

# EXIF orientation -> the operation on a (C, H, W) tensor that PIL's ImageOps.exif_transpose performs.
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
}
_TORCH_MODES = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}


def check_decoder(decoder: str, device: torch.device | str | None = None) -> None:
    """Refuse a ``data.decoder`` this machine cannot run, before any work starts.

    Raises:
        UsageError: Unknown decoder, or ``cuda`` without a CUDA GPU (or with ``runtime.device`` not a CUDA device).
    """
    from roadwork_cli.errors import UsageError

    if decoder not in DECODERS:
        raise UsageError(f"data.decoder {decoder!r} is not a decoder: use one of {', '.join(DECODERS)}.")
    if decoder == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "data.decoder cuda decodes JPEGs on a CUDA GPU, but torch sees none on this machine; use data.decoder "
                "pil (the default)."
            )
        if device is not None and torch.device(device).type != "cuda":
            raise UsageError(f"data.decoder cuda needs runtime.device cuda (got {device}); use data.decoder pil.")


def jpeg_orientation(data: bytes, recipe: DecodeRecipe) -> int | None:
    """EXIF orientation (1-8) of a plain RGB / greyscale JPEG within the recipe's limits, or None: not for nvjpeg.

    Reads the header only. Anything else (PNG, CMYK, too many pixels, no end-of-image marker, not an image) goes
    through the PIL path, which decodes it or names why it cannot: a decoder that filled a truncated file in would
    turn a rejected input into pixels.
    """
    from PIL import Image

    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None  # not a JPEG, or one without its end marker: PIL decides whether it is truncated
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        width, height = image.size
        if image.mode not in ("RGB", "L") or width * height > recipe.max_pixels:
            return None
        orientation = int(image.getexif().get(0x0112, 1) or 1)
        return orientation if 1 <= orientation <= 8 else 1
    except Exception:  # noqa: BLE001 - the PIL path reports the reason
        return None


def draft_scale(image: torch.Tensor, draft_side: int) -> torch.Tensor:
    """What JPEG draft decoding (:func:`~roadwork_cli.data.pixels.decode_jpeg_draft`) does, on a full decode.

    ``image`` is in the stored orientation (before EXIF rotation), where the DCT blocks are aligned. PIL picks the
    scale ``1/s`` (s in 8, 4, 2, 1) with ``s <= min(W // side, H // side)`` and decodes ``ceil(W / s) x ceil(H / s)``
    pixels; the scaled IDCT is close to averaging ``s x s`` blocks, which is what this does. Below ``2 * side`` the
    PIL path decodes fully, and so does this (the image is returned unchanged).
    """
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    if min(width, height) < 2 * draft_side:
        return image
    ratio = min(width // draft_side, height // draft_side)
    scale = next(s for s in (8, 4, 2, 1) if ratio >= s)
    if scale == 1:
        return image
    pooled = F.avg_pool2d(image[None].float(), scale, scale, ceil_mode=True)[0]
    return pooled.round_().clamp_(0, 255).to(torch.uint8)


def resize_crop(image: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """``(3, H, W)`` uint8 (any device) -> ``(S, S, 3)`` uint8: the eval resize + centre crop of ``eval_pixels``.

    The same output-size arithmetic, crop offsets and zero padding as :func:`roadwork_cli.data.pixels.eval_pixels`;
    the filter is torch's antialiased one (bicubic / bilinear), which approximates PIL's to about a grey level.
    """
    import torch.nn.functional as F

    size = int(preprocessing.size)
    target = int(math.floor(size / max(preprocessing.crop_pct, 1e-6)))
    height, width = image.shape[-2:]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target, int(target * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        mode = _TORCH_MODES.get(str(preprocessing.interpolation).lower(), "bicubic")
        smooth = mode in ("bilinear", "bicubic")
        resized = F.interpolate(
            image[None].float(),
            size=(new_h, new_w),
            mode=mode,
            antialias=smooth,
            align_corners=False if smooth else None,
        )
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        height, width = new_h, new_w
    if size > width or size > height:  # crop_pct > 1: zero borders, split as torchvision splits them
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        image = F.pad(image, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = image.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[:, top : top + size, left : left + size].permute(1, 2, 0)  # (S, S, 3)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(C, H, W)`` as PIL's ``ImageOps.exif_transpose`` turns an image of this EXIF orientation (1-8)."""
    return image if orientation == 1 else _ORIENT[orientation](image)


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> ``(3, H, W)`` uint8 RGB on ``device`` in the stored orientation, one batched nvjpeg call.

    An input the decoder refuses is None (the caller gives it to the PIL path): a failed batch call is retried one
    image at a time, so one bad file costs only itself.
    """
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded: list[torch.Tensor | None] = list(tv_decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - find the one(s) that failed
        decoded = []
        for tensor in tensors:
            try:
                decoded.append(tv_decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001 - the PIL path names the reason
                decoded.append(None)
    return decoded


class GpuDecodeLoader:
    """What :func:`create_loader` returns for ``data.decoder: cuda``: the same ``(indices, pixels, failed)`` batches.

    A thread pool reads each batch's bytes and JPEG headers (one batch ahead); plain JPEGs of the clean view are
    decoded together on the GPU and resized there (:func:`resize_crop`), so ``pixels`` is ``(B, S, S, 3)`` uint8 on
    ``device``. Seeded (augmented) items, other formats and files nvjpeg refuses take the dataset's PIL path, so one
    bad file is still one failure with its reason.
    """

    def __init__(self, dataset: ImageDataset, batches: Sequence[Sequence[int]], workers: int, device: torch.device):
        self.dataset, self.batches, self.device = dataset, [list(b) for b in batches], device
        self.workers = max(1, workers)

    def __len__(self) -> int:
        return len(self.batches)

    def _read(self, index: int) -> tuple[bytes, int] | None:
        """``(bytes, orientation)`` of a clean-view JPEG for nvjpeg, or None for the PIL path."""
        from roadwork_cli.data.images import read_bytes

        dataset, recipe = self.dataset, self.dataset.recipe
        item = dataset.items[index]
        if dataset.seeds is not None and dataset.seeds[index] is not None:
            return None
        try:
            if isinstance(item, bytes | bytearray | memoryview):
                data = bytes(item)
                if len(data) > recipe.max_file_bytes:
                    return None
            elif isinstance(item, str | os.PathLike):  # a file or a parquet row locator
                data = read_bytes(os.fspath(item), recipe.max_file_bytes)
            else:
                return None
        except Exception:  # noqa: BLE001 - the PIL path reads it again and names the reason
            return None
        orientation = jpeg_orientation(data, recipe)
        return None if orientation is None else (data, orientation)

    def _batch(self, indices: list[int], read: list[tuple[bytes, int] | None], pool: Any) -> tuple:
        jpeg = [k for k, r in enumerate(read) if r is not None]
        decoded = decode_jpegs([read[k][0] for k in jpeg], self.device) if jpeg else []
        pixels: list[torch.Tensor | None] = [None] * len(indices)
        recipe = self.dataset.recipe
        for k, image in zip(jpeg, decoded, strict=True):
            if image is not None:
                if recipe.draft_side is not None:
                    image = draft_scale(image, recipe.draft_side)
                pixels[k] = resize_crop(orient(image, read[k][1]), recipe.preprocessing)
        rest = [k for k, x in enumerate(pixels) if x is None]
        failed = []
        for k, (_, x, reason) in zip(rest, pool.map(self.dataset.__getitem__, [indices[k] for k in rest]), strict=True):
            if x is None:
                failed.append((indices[k], str(reason)))
            else:
                pixels[k] = x.to(self.device, non_blocking=True)
        good = [k for k, x in enumerate(pixels) if x is not None]
        stacked = torch.stack([pixels[k] for k in good]) if good else None  # (B, S, S, 3) on device
        return [indices[k] for k in good], stacked, failed

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor | None, list[Failure]]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="roadwork-read") as pool:
            ahead = [pool.map(self._read, batch) for batch in self.batches[:1]]
            for b, batch in enumerate(self.batches):
                if b + 1 < len(self.batches):
                    ahead.append(pool.map(self._read, self.batches[b + 1]))
                yield self._batch(batch, list(ahead.pop(0)), pool)
