"""Image -> tensor transforms built from a backbone's :class:`~roadwork_cli.model.backbones.Preprocessing`.

``eval_transform`` is the deterministic path used for clean features, validation and prediction;
``train_transform`` adds moderate augmentation for the cached augmented views. Both take an RGB ``PIL.Image`` and
return a normalised ``(3, size, size)`` float tensor.

Example:
    >>> from roadwork_cli.model.backbones import Preprocessing
    >>> transform = eval_transform(Preprocessing(size=224))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

if TYPE_CHECKING:
    from roadwork_cli.model.backbones import Preprocessing

__all__ = ["eval_transform", "train_transform"]


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        return InterpolationMode.BICUBIC


def eval_transform(preprocessing: Preprocessing) -> T.Compose:
    """Resize the shorter side to ``size / crop_pct``, centre-crop ``size``, to tensor, normalise."""
    size = int(preprocessing.size)
    resize = int(math.floor(size / max(preprocessing.crop_pct, 1e-6)))
    return T.Compose(
        [
            T.Resize(resize, interpolation=_interpolation(preprocessing.interpolation)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


def train_transform(preprocessing: Preprocessing) -> T.Compose:
    """Moderate augmentation: random resized crop (scale 0.5-1), horizontal flip, +-10 deg rotation, colour jitter.

    Randomness comes from torch's global generator, so seeding it right before the call makes a view reproducible.
    """
    size = int(preprocessing.size)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=_interpolation(preprocessing.interpolation)),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10, interpolation=InterpolationMode.BILINEAR),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            T.ToTensor(),
            T.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )
