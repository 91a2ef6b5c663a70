"""The NATIX StreetVision validators' challenge images, levels 0-3, in PIL and numpy (no torch).

Validators send a 224 x 224 re-compressed JPEG made from a real or generated photo at one of four cumulative levels:
(0) square centre crop; (1) + rotation, random resized crop, horizontal and vertical flips; (2) + colour, contrast and
JPEG degradation; (3) + Gaussian noise and blur (ranges below, drawn by :func:`sample_natix_params`). The
``natix`` augmentation (:class:`~roadwork_cli.data.transforms.NatixAugmentation`) and ``evaluate --robustness`` draw
challenges from here; every draw comes from one ``numpy`` generator, so a seed gives the same image anywhere.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> challenge_image(Image.new("RGB", (320, 240)), level=2, rng=np.random.default_rng(0)).size
    (224, 224)
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

__all__ = [
    "CHALLENGE_JPEG_QUALITY",
    "CHALLENGE_SIZE",
    "NatixParams",
    "apply_natix_params",
    "challenge_image",
    "level_mix",
    "natix_level",
    "natix_spec",
    "sample_natix_params",
]

CHALLENGE_SIZE = 224
"""Side of the square JPEG NATIX validators send; levels 1-3 operate at this resolution."""
CHALLENGE_JPEG_QUALITY = 90
"""Quality of the final re-compression of a challenge image (the validators' exact value is not published)."""
NATIX_MAX_ROTATION = 20.0
NATIX_CROP_SCALE = (0.2, 1.0)
NATIX_CROP_RATIO = (3 / 4, 4 / 3)
NATIX_FLIP_P = 0.5
NATIX_SATURATION = (0.5, 1.5)
NATIX_CONTRAST = (0.5, 1.5)
NATIX_JPEG_QUALITY = (20, 90)
NATIX_JPEG_SCALE = (0.5, 1.0)
NATIX_NOISE_STD = (2.0, 12.0)  # on the 0-255 scale
NATIX_BLUR_SIGMA = (0.3, 1.5)  # pixels at the challenge resolution


@dataclass(frozen=True)
class NatixParams:
    """The random draws of one challenge image; the defaults are level 0 (square centre crop only).

    Attributes:
        level: 0-3.
        angle: Rotation in degrees, counter-clockwise, black corners (level >= 1).
        crop: ``(left, top, width, height)`` of the random resized crop inside the square, or None for all of it.
        hflip: Mirror left-right.
        vflip: Mirror top-bottom.
        saturation: PIL colour-enhance factor (1 = unchanged; level >= 2).
        contrast: PIL contrast-enhance factor (level >= 2).
        jpeg_quality: Quality of the JPEG round trip, or None for none (level >= 2).
        jpeg_scale: Side fraction the image is down-sampled to before that JPEG and up-sampled from after it.
        noise_std: Gaussian pixel noise std on the 0-255 scale (level 3).
        blur_sigma: Gaussian blur radius in pixels (level 3).
    """

    level: int = 0
    angle: float = 0.0
    crop: tuple[int, int, int, int] | None = None
    hflip: bool = False
    vflip: bool = False
    saturation: float = 1.0
    contrast: float = 1.0
    jpeg_quality: int | None = None
    jpeg_scale: float = 1.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0


def _centre_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _random_crop_box(side: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random resized crop box of area fraction in ``NATIX_CROP_SCALE`` and aspect in ``NATIX_CROP_RATIO``.

    Unlike torchvision's rejection loop, the aspect range is narrowed to what fits the drawn area, so every draw is
    valid and the area fraction stays uniform; sides round up, so the area never falls below the drawn fraction.
    """
    area = float(rng.uniform(*NATIX_CROP_SCALE))
    low, high = max(NATIX_CROP_RATIO[0], area), min(NATIX_CROP_RATIO[1], 1.0 / area)
    ratio = math.exp(rng.uniform(math.log(low), math.log(high)))  # width / height
    width = min(side, math.ceil(math.sqrt(area * ratio) * side))
    height = min(side, math.ceil(math.sqrt(area / ratio) * side))
    left = int(rng.integers(0, side - width + 1))
    top = int(rng.integers(0, side - height + 1))
    return left, top, width, height


def sample_natix_params(level: int, side: int, rng: np.random.Generator) -> NatixParams:
    """Draw the random parameters of one challenge image of ``level`` on a ``side`` x ``side`` square.

    Levels are cumulative: (0) square centre crop; (1) + rotation within +-20 deg, random resized crop of area
    fraction 0.2-1, horizontal and vertical flips each with p=0.5; (2) + saturation and contrast factors in 0.5-1.5 and
    a JPEG round trip at quality 20-90 through a down-sampling to 50-100 % of the side; (3) + Gaussian noise (std 2-12
    of 255) and Gaussian blur (radius 0.3-1.5 px).
    """
    if level not in (0, 1, 2, 3):
        raise ValueError(f"NATIX level must be 0, 1, 2 or 3, got {level!r}")
    draws: dict[str, Any] = {"level": level}
    if level >= 1:
        draws["angle"] = float(rng.uniform(-NATIX_MAX_ROTATION, NATIX_MAX_ROTATION))
        draws["crop"] = _random_crop_box(side, rng)
        draws["hflip"] = bool(rng.random() < NATIX_FLIP_P)
        draws["vflip"] = bool(rng.random() < NATIX_FLIP_P)
    if level >= 2:
        draws["saturation"] = float(rng.uniform(*NATIX_SATURATION))
        draws["contrast"] = float(rng.uniform(*NATIX_CONTRAST))
        draws["jpeg_quality"] = int(rng.integers(NATIX_JPEG_QUALITY[0], NATIX_JPEG_QUALITY[1] + 1))
        draws["jpeg_scale"] = float(rng.uniform(*NATIX_JPEG_SCALE))
    if level >= 3:
        draws["noise_std"] = float(rng.uniform(*NATIX_NOISE_STD))
        draws["blur_sigma"] = float(rng.uniform(*NATIX_BLUR_SIGMA))
    return NatixParams(**draws)


def _jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def apply_natix_params(square: Image.Image, params: NatixParams, rng: np.random.Generator) -> Image.Image:
    """Apply drawn parameters to a square RGB image; the output has the input's size.

    Args:
        square: The level-0 image (square centre crop, already at the working resolution).
        params: From :func:`sample_natix_params`.
        rng: Source of the per-pixel noise (used only when ``params.noise_std > 0``).
    """
    image = square.convert("RGB")
    side = image.size[0]
    if params.angle:
        image = image.rotate(params.angle, resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    if params.crop is not None:
        left, top, width, height = params.crop
        image = image.crop((left, top, left + width, top + height)).resize((side, side), Image.BICUBIC)
    if params.hflip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if params.vflip:
        image = image.transpose(Image.FLIP_TOP_BOTTOM)
    if params.saturation != 1.0:
        image = ImageEnhance.Color(image).enhance(params.saturation)
    if params.contrast != 1.0:
        image = ImageEnhance.Contrast(image).enhance(params.contrast)
    if params.jpeg_quality is not None:
        small = max(8, round(side * params.jpeg_scale))
        degraded = _jpeg_round_trip(image.resize((small, small), Image.BILINEAR), params.jpeg_quality)
        image = degraded.resize((side, side), Image.BILINEAR)
    if params.blur_sigma > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
    if params.noise_std > 0:
        pixels = np.asarray(image, dtype=np.float32)  # (S, S, 3)
        pixels = pixels + rng.normal(0.0, params.noise_std, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


def natix_level(
    image: Image.Image, level: int, rng: np.random.Generator, size: int | None = CHALLENGE_SIZE
) -> Image.Image:
    """One NATIX challenge level applied to ``image`` (levels in :func:`sample_natix_params`).

    Args:
        image: Any RGB image.
        level: 0, 1, 2 or 3.
        rng: The only source of randomness (level 0 draws nothing).
        size: Side the square centre crop is resized to before the level's operations (the validators' 224); None
            keeps the crop's own resolution.

    Returns:
        A square RGB image of side ``size`` (or the shorter side of ``image``).
    """
    square = _centre_square(image.convert("RGB"))
    if size is not None and square.size[0] != size:
        square = square.resize((size, size), Image.BICUBIC)
    params = sample_natix_params(level, square.size[0], rng)
    return apply_natix_params(square, params, rng)


def level_mix(levels: Sequence[float] | None = None, level: int | None = None) -> np.ndarray:
    """Probabilities of levels 0-3: ``levels`` normalised (default uniform), or one-hot for a single ``level``.

    Raises:
        ValueError: A level outside 0-3, or weights that are not four non-negative numbers with a positive sum.
    """
    if level is not None:
        if level not in (0, 1, 2, 3):
            raise ValueError(f"NATIX level must be 0, 1, 2 or 3, got {level!r}")
        return np.eye(4)[level]
    mix = np.asarray((0.25, 0.25, 0.25, 0.25) if levels is None else levels, dtype=np.float64)
    if mix.shape != (4,) or (mix < 0).any() or mix.sum() <= 0:
        raise ValueError(f"NATIX levels must be four non-negative weights of levels 0-3, got {levels!r}")
    return mix / mix.sum()


def challenge_image(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """What a validator sends: :func:`natix_level` at the 224 px challenge size, then the final JPEG re-compression."""
    return _jpeg_round_trip(natix_level(image, level, rng), CHALLENGE_JPEG_QUALITY)


def natix_spec() -> dict[str, Any]:
    """The fixed recipe of every challenge (size, final JPEG quality, the levels' ranges), for fingerprints."""
    return {
        "challenge_size": CHALLENGE_SIZE,
        "jpeg_quality": CHALLENGE_JPEG_QUALITY,
        "ranges": {
            "rotation": NATIX_MAX_ROTATION,
            "crop_scale": NATIX_CROP_SCALE,
            "crop_ratio": NATIX_CROP_RATIO,
            "flip_p": NATIX_FLIP_P,
            "saturation": NATIX_SATURATION,
            "contrast": NATIX_CONTRAST,
            "jpeg_quality": NATIX_JPEG_QUALITY,
            "jpeg_scale": NATIX_JPEG_SCALE,
            "noise_std": NATIX_NOISE_STD,
            "blur_sigma": NATIX_BLUR_SIGMA,
        },
    }
