"""Synthetic inputs shared by the benchmarks: random JPEG writers and ``splits.json`` (no downloads, seeded).

One writer (:func:`write_jpegs`) saves the images; the scene functions say what they look like:
:func:`street_scene` (gradient sky, road, coloured boxes: ``cache-features``), :func:`photo_frame` (smooth colour
fields plus texture noise, so they compress like real frames: ``predict``) and :func:`tinted_noise` (noise whose red
or blue channel is lifted by the label, so a model can learn it: the GPU training check).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def write_jpegs(
    folder: Path, n: int, render: Callable[[int], tuple], name: str = "{:05d}.jpg", threads: int = 1
) -> list[Path]:
    """Write ``n`` JPEGs ``folder / name.format(k)`` from ``render(k) -> (PIL image, quality)``, in index order.

    Args:
        folder: Created if missing.
        n: Number of images.
        render: Image ``k`` and its JPEG quality.
        name: File name pattern, formatted with ``k``.
        threads: Writers in parallel; above 1 only for a ``render`` that shares no state across ``k`` (a random
            generator drawn in sequence would then give other images).
    """
    folder.mkdir(parents=True, exist_ok=True)

    def one(k: int) -> Path:
        image, quality = render(k)
        path = folder / name.format(k)
        image.save(path, quality=quality)
        return path

    if threads <= 1:
        return [one(k) for k in range(n)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def street_scene(rng: np.random.Generator, size: tuple[int, int] = (320, 240)) -> tuple:
    """A street-like scene (gradient sky to grey road, six random boxes) and a random quality in [70, 95)."""
    from PIL import Image, ImageDraw

    width, height = size
    y = np.linspace(0, 1, height)[:, None, None]
    base = (np.array([90, 140, 220]) * (1 - y) + np.array([70, 70, 70]) * y).repeat(width, axis=1)
    noise = rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 20), rng.integers(100, height - 20)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([x0, y0, x0 + rng.integers(5, 40), y0 + rng.integers(5, 40)], fill=colour)
    return image, int(rng.integers(70, 95))


def photo_frame(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> tuple:
    """A photo-like frame (bicubic-upsampled 8x6 colour field plus noise, ~50-90 KB at 640x480) at quality 90."""
    from PIL import Image

    width, height = size
    coarse = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), 90


def tinted_noise(rng: np.random.Generator, side: int, label: int) -> tuple:
    """Square noise whose red (label 1) or blue (label 0) channel is lifted by 100, at quality 90."""
    from PIL import Image

    pixels = rng.integers(0, 110, (side, side, 3)).astype(np.uint8)
    pixels[..., 0 if label else 2] += 100
    return Image.fromarray(pixels), 90


def write_splits(path: Path, splits: dict[str, list[str]], samples: dict[str, dict], seed: int = 0) -> Path:
    """``splits.json`` at ``path`` (atomic): ids per split, one ``{path, label, source, group}`` entry per id."""
    from roadwork_cli.data.splits import SPLITS_VERSION  # lazily: bench_predict times a cold start without it
    from roadwork_cli.io.atomic import atomic_write_json

    return atomic_write_json(path, {"version": SPLITS_VERSION, "seed": seed, "splits": splits, "samples": samples})
