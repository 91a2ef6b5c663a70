"""Image -> tensor transforms built from a backbone's :class:`~roadwork_cli.model.backbones.Preprocessing`.

``eval_transform`` is the deterministic path used for clean features, validation and prediction;
``train_transform`` adds moderate augmentation for the cached augmented views. Both take an RGB ``PIL.Image`` and
return a normalised ``(3, size, size)`` float tensor.

For throughput, both can instead return the ``(size, size, 3)`` uint8 pixels (``output="uint8"``): DataLoader
workers then ship a quarter of the bytes, and :func:`normalize_batch` converts a whole ``(B, H, W, 3)`` batch in one
vectorised op straight into the channels-last ``(B, 3, H, W)`` layout the backbone wants.

Example:
    >>> from roadwork_cli.model.backbones import Preprocessing
    >>> transform = eval_transform(Preprocessing(size=224))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

if TYPE_CHECKING:
    from roadwork_cli.model.backbones import Preprocessing

__all__ = ["eval_transform", "normalize_batch", "train_transform"]


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        return InterpolationMode.BICUBIC


class _ToHWCUint8:
    """RGB ``PIL.Image`` -> ``(H, W, 3)`` uint8 tensor (no float conversion, no copy beyond PIL's buffer)."""

    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _tail(preprocessing: Preprocessing, output: str) -> list:
    if output == "uint8":
        return [_ToHWCUint8()]
    if output != "float":
        raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
    return [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]


def eval_transform(preprocessing: Preprocessing, output: Literal["float", "uint8"] = "float") -> T.Compose:
    """Resize the shorter side to ``size / crop_pct``, centre-crop ``size``, to tensor, normalise.

    Args:
        preprocessing: The backbone's input recipe.
        output: ``float``: normalised ``(3, H, W)``; ``uint8``: raw ``(H, W, 3)`` pixels for :func:`normalize_batch`.
    """
    size = int(preprocessing.size)
    resize = int(math.floor(size / max(preprocessing.crop_pct, 1e-6)))
    return T.Compose(
        [
            T.Resize(resize, interpolation=_interpolation(preprocessing.interpolation)),
            T.CenterCrop(size),
            *_tail(preprocessing, output),
        ]
    )


def train_transform(preprocessing: Preprocessing, output: Literal["float", "uint8"] = "float") -> T.Compose:
    """Moderate augmentation: random resized crop (scale 0.5-1), horizontal flip, +-10 deg rotation, colour jitter.

    Randomness comes from torch's global generator, so seeding it right before the call makes a view reproducible.
    ``output`` is as in :func:`eval_transform`.
    """
    size = int(preprocessing.size)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=_interpolation(preprocessing.interpolation)),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10, interpolation=InterpolationMode.BILINEAR),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            *_tail(preprocessing, output),
        ]
    )


def normalize_batch(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> normalised ``(B, 3, H, W)`` float32 in channels-last memory layout.

    Equals stacking ``eval_transform(p)`` outputs up to float rounding; the permute is free because channels-last
    *is* the HWC layout.
    """
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255.0
    images = pixels.permute(0, 3, 1, 2).float()  # (B, 3, H, W), strides of channels-last
    return images.sub_(mean).div_(std)
