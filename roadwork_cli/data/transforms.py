"""Image -> tensor transforms built from a backbone's :class:`~roadwork_cli.model.backbones.Preprocessing`.

``eval_transform`` is the deterministic path used for clean features, validation and prediction;
``train_transform`` is the ``moderate`` augmentation below, seeded through torch's global generator. Both take an
RGB ``PIL.Image`` and return a normalised ``(3, size, size)`` float tensor.

For throughput, both can instead return the ``(size, size, 3)`` uint8 pixels (``output="uint8"``): DataLoader
workers then ship a quarter of the bytes, and :func:`normalize_batch` converts a whole ``(B, H, W, 3)`` batch in one
vectorised op straight into the channels-last ``(B, 3, H, W)`` layout the backbone wants.

Augmentations (``data.augment``) live in a small registry, :func:`create_augmentation` / :func:`list_augmentations`:

- ``none``: the eval transform;
- ``moderate`` and ``aggressive``: timm's ``create_transform(is_training=True, ...)`` presets (see their factories);
- ``natix``: the NATIX StreetVision validators' challenge levels 0-3 (:mod:`roadwork_cli.data.natix`), mixed with
  configurable probabilities.

Every augmentation is called as ``augmentation(image, seed)``; the same seed gives the same pixels, whatever the
process, worker or batch, and :func:`augment_seed` derives the seed of one (image id, view, epoch).

Example:
    >>> from roadwork_cli.data.preprocessing import Preprocessing
    >>> transform = eval_transform(Preprocessing(size=224))
    >>> natix = create_augmentation("natix", Preprocessing(size=224), levels=(0.1, 0.3, 0.3, 0.3))
    >>> # x = natix(image, seed=augment_seed(image_id, view=1, epoch=3))  # (3, 224, 224)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from roadwork_cli.config import DataSettings
from roadwork_cli.data.natix import challenge_image, level_mix, natix_spec
from roadwork_cli.registry import Registry

if TYPE_CHECKING:
    from roadwork_cli.data.preprocessing import Preprocessing

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "NatixAugmentation",
    "TimmAugmentation",
    "augment_seed",
    "augmentation_from_settings",
    "create_augmentation",
    "eval_transform",
    "list_augmentations",
    "normalize_batch",
    "train_transform",
]

Output = Literal["float", "uint8"]


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


def _check_output(output: str) -> None:
    if output not in ("float", "uint8"):
        raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")


def _tail(preprocessing: Preprocessing, output: str) -> list:
    _check_output(output)
    if output == "uint8":
        return [_ToHWCUint8()]
    return [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]


def eval_transform(preprocessing: Preprocessing, output: Output = "float") -> T.Compose:
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


def train_transform(preprocessing: Preprocessing, output: Output = "float") -> Augmentation:
    """The ``moderate`` augmentation (see :func:`create_augmentation`), called as ``transform(image)``.

    Without an explicit seed its seed is drawn from torch's global generator, so seeding it right before the call
    makes a view reproducible. ``output`` is as in :func:`eval_transform`.
    """
    return create_augmentation("moderate", preprocessing, output=output)


@functools.lru_cache(maxsize=16)
def _scaled_statistics(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 3, 1, 1)`` mean and std times 255 on ``device``, made once: building them from Python lists on a GPU is
    a blocking host-to-device copy, which waited for every queued kernel once per batch. Read-only."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    return mean_t, std_t


def normalize_batch(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> normalised ``(B, 3, H, W)`` float32 in channels-last memory layout.

    Equals stacking ``eval_transform(p)`` outputs up to float rounding; the permute is free because channels-last
    *is* the HWC layout.
    """
    mean, std = _scaled_statistics(tuple(preprocessing.mean), tuple(preprocessing.std), pixels.device)
    images = pixels.permute(0, 3, 1, 2).float()  # (B, 3, H, W), strides of channels-last
    return images.sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------------------------- seeds


def augment_seed(image_id: str, view: int, epoch: int = 0) -> int:
    """Seed of the augmentation of ``view`` of ``image_id`` in ``epoch`` (independent of batch, worker and run).

    Epoch 0 hashes ``"<id>:<view>"``, the key the feature cache's augmented views have always used, so cached views
    stay valid; later epochs append ``":<epoch>"``. The result is a non-negative 63-bit integer.
    """
    key = f"{image_id}:{view}" if epoch == 0 else f"{image_id}:{view}:{epoch}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def _seed_from_torch() -> int:
    # A caller that seeded torch's global generator (the pre-registry convention) still gets a reproducible view.
    return int(torch.randint(0, 2**62, ()).item())


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators for the block, then restore all three.

    timm's transforms draw from all three (``random`` for crops and RandAugment, NumPy for op choice, torch for flips,
    colour jitter and random erasing), so this is the only way to make them a function of an explicit seed without
    disturbing the caller's streams.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------------- the registry


class Augmentation:
    """A seeded image -> tensor transform: ``augmentation(image, seed)``.

    Attributes:
        name: Registry name.
        output: ``float`` (normalised ``(3, S, S)``) or ``uint8`` (``(S, S, 3)`` pixels for :func:`normalize_batch`).
    """

    name = "augmentation"

    def __init__(self, preprocessing: Preprocessing, output: Output = "float"):
        _check_output(output)
        self.preprocessing = preprocessing
        self.output = output

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        """Augment one RGB image.

        Args:
            image: The decoded image.
            seed: The view's seed (see :func:`augment_seed`); None draws one from torch's global generator, so
                ``torch.manual_seed`` before the call also reproduces the view.
        """
        return self.apply(image, _seed_from_torch() if seed is None else int(seed))

    def apply(self, image: Image.Image, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The JSON-able options that decide the pixels, besides the preprocessing (which the backbone fingerprints)."""
        return {}

    @property
    def spec(self) -> dict[str, Any]:
        """``{"name": ..., **options}``: what a feature cache records next to its augmented views."""
        return json.loads(json.dumps({"name": self.name, **self.options()}))  # tuples -> lists, as read back

    @property
    def fingerprint(self) -> str:
        """Short hash of :attr:`spec`: views drawn under another fingerprint are other pixels and must not be reused."""
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, output={self.output!r})"


AUGMENTATIONS: Registry[Callable[..., Augmentation]] = Registry("augmentation")
"""Factories ``fn(preprocessing, output="float", **options) -> Augmentation`` by ``data.augment`` name."""
_register = AUGMENTATIONS.register


def list_augmentations() -> list[str]:
    """Names accepted by :func:`create_augmentation` (and by ``data.augment``)."""
    return AUGMENTATIONS.names()


def create_augmentation(name: str, preprocessing: Preprocessing, output: Output = "float", **kwargs) -> Augmentation:
    """Build a registered augmentation.

    Args:
        name: One of :func:`list_augmentations`.
        preprocessing: The backbone's input recipe (output size, mean/std, interpolation).
        output: ``float`` or ``uint8``, as in :func:`eval_transform`.
        **kwargs: Options of that augmentation: for ``moderate``/``aggressive`` overrides of the timm
            ``create_transform`` arguments; for ``natix`` ``levels`` (mix) or ``level`` (one level).

    Raises:
        UnknownNameError: Unknown name (a :class:`~roadwork_cli.errors.UsageError`).
        ValueError: Bad options (output kind, NATIX levels).
    """
    return AUGMENTATIONS.get(name)(preprocessing, output=output, **kwargs)


def augmentation_from_settings(
    data: DataSettings, preprocessing: Preprocessing, output: Output = "float"
) -> Augmentation:
    """The augmentation ``data.augment`` names, with ``data.natix_levels`` as the mix when it is ``natix``.

    Args:
        data: :class:`~roadwork_cli.config.DataSettings`.
        preprocessing: The backbone's input recipe.
        output: ``float`` or ``uint8``.
    """
    kwargs = {"levels": tuple(data.natix_levels)} if data.augment == "natix" else {}
    return create_augmentation(data.augment, preprocessing, output=output, **kwargs)


class _EvalAugmentation(Augmentation):
    name = "none"

    def __init__(self, preprocessing: Preprocessing, output: Output = "float"):
        super().__init__(preprocessing, output)
        self.transform = eval_transform(preprocessing, output)

    def apply(self, image: Image.Image, seed: int) -> torch.Tensor:
        return self.transform(image)


@_register("none")
def _none(preprocessing: Preprocessing, output: Output = "float") -> Augmentation:
    """No augmentation: the deterministic :func:`eval_transform` (the seed is ignored)."""
    return _EvalAugmentation(preprocessing, output)


class TimmAugmentation(Augmentation):
    """A timm ``create_transform(is_training=True, ...)`` pipeline run under :func:`_seeded_global_rngs`.

    timm's random erasing only exists on the normalised float tensor, so ``uint8`` output runs the float pipeline and
    maps it back to pixels (exact for untouched pixels; erased ones become the colour their noise denormalises to).
    """

    def __init__(self, name: str, preprocessing: Preprocessing, output: Output = "float", **timm_kwargs):
        from timm.data import create_transform

        super().__init__(preprocessing, output)
        self.name = name
        self.timm_kwargs = dict(timm_kwargs)
        self.transform = create_transform(
            input_size=int(preprocessing.size),
            is_training=True,
            interpolation=preprocessing.interpolation,
            mean=tuple(preprocessing.mean),
            std=tuple(preprocessing.std),
            **self.timm_kwargs,
        )
        self._mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)

    def options(self) -> dict[str, Any]:
        import timm

        return {"timm": self.timm_kwargs, "timm_version": timm.__version__}

    def apply(self, image: Image.Image, seed: int) -> torch.Tensor:
        with _seeded_global_rngs(seed):
            x = self.transform(image.convert("RGB"))  # (3, S, S) normalised
        if self.output == "float":
            return x
        pixels = (x * self._std + self._mean).mul_(255.0).round_().clamp_(0, 255)
        return pixels.to(torch.uint8).permute(1, 2, 0).contiguous()  # (S, S, 3)


MODERATE = {
    "scale": (0.35, 1.0),
    "hflip": 0.5,
    "vflip": 0.0,
    "auto_augment": "rand-m6-n2-mstd0.5-inc1-tweights",
    "color_jitter": None,
    "re_prob": 0.1,
    "re_mode": "pixel",
    "re_count": 1,
}
# The same pipeline, stronger: smaller crops, vertical flips too, magnitude 9 with uniform op weights, more erasing.
AGGRESSIVE = {
    **MODERATE,
    "scale": (0.08, 1.0),
    "vflip": 0.5,
    "auto_augment": "rand-m9-n2-mstd0.5-inc1",
    "re_prob": 0.25,
    "re_count": 2,
}


@_register("moderate")
def _moderate(preprocessing: Preprocessing, output: Output = "float", **overrides) -> Augmentation:
    """timm preset for light training: what a clean, mostly upright dashcam image tolerates.

    - random resized crop, area scale 0.35-1, aspect 3/4-4/3 (timm default), the backbone's interpolation;
    - horizontal flip p=0.5, no vertical flip;
    - RandAugment ``rand-m6-n2-mstd0.5-inc1-tweights``: 2 distinct ops per image (each applied with p=0.5),
      magnitude 6 of 10 with Gaussian noise of std 0.5, "increasing" ops drawn with timm's experimental weights
      (mostly rotate / shear / translate; invert, solarize and posterize rare, as cone orange must stay orange);
      timm then skips colour jitter (RandAugment has its own colour ops), hence ``color_jitter=None``;
    - random erasing p=0.1, one box, per-pixel Gaussian noise fill (``re_mode="pixel"``).
    """
    return TimmAugmentation("moderate", preprocessing, output, **{**MODERATE, **overrides})


@_register("aggressive")
def _aggressive(preprocessing: Preprocessing, output: Output = "float", **overrides) -> Augmentation:
    """timm preset close to the DeiT recipe, plus the vertical flips NATIX validators use.

    - random resized crop, area scale 0.08-1 (the ImageNet default), aspect 3/4-4/3;
    - horizontal flip p=0.5 and vertical flip p=0.5;
    - RandAugment ``rand-m9-n2-mstd0.5-inc1`` (DeiT's): 2 ops per image (each with p=0.5) drawn uniformly from the
      15 "increasing" ops, magnitude 9 of 10, std 0.5; no separate colour jitter (as above);
    - random erasing p=0.25, one or two boxes, per-pixel Gaussian noise fill.
    """
    return TimmAugmentation("aggressive", preprocessing, output, **{**AGGRESSIVE, **overrides})


# ----------------------------------------------------------------------------------------------------------- NATIX


class NatixAugmentation(Augmentation):
    """The validators' challenge: a level drawn from the mix, the 224 px JPEG they send
    (:func:`~roadwork_cli.data.natix.challenge_image`), then the miner's own :func:`eval_transform` (exactly what
    ``predict`` does with a received challenge).

    Args:
        preprocessing: The backbone's input recipe.
        output: ``float`` or ``uint8``.
        levels: Probabilities (weights) of levels 0-3.
        level: A single level instead of a mix (the robustness evaluation scores each level on its own).
    """

    name = "natix"

    def __init__(
        self,
        preprocessing: Preprocessing,
        output: Output = "float",
        levels: Sequence[float] | None = None,
        level: int | None = None,
    ):
        super().__init__(preprocessing, output)
        self.mix = level_mix(levels, level)
        self.transform = eval_transform(preprocessing, output)

    def draw_level(self, rng: np.random.Generator) -> int:
        """The level of one view (a fixed level draws nothing, so its stream equals a direct ``natix_level``)."""
        if np.count_nonzero(self.mix) == 1:
            return int(np.flatnonzero(self.mix)[0])
        return int(rng.choice(4, p=self.mix))

    def challenge(self, image: Image.Image, seed: int) -> Image.Image:
        """The 224 x 224 JPEG-recompressed challenge image of ``seed`` (what a validator would send)."""
        rng = np.random.default_rng(seed)
        return challenge_image(image, self.draw_level(rng), rng)

    def apply(self, image: Image.Image, seed: int) -> torch.Tensor:
        return self.transform(self.challenge(image, seed))

    def options(self) -> dict[str, Any]:
        return {"levels": self.mix.tolist(), **natix_spec()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(levels={self.mix.round(3).tolist()}, output={self.output!r})"


@_register("natix")
def _natix(
    preprocessing: Preprocessing,
    output: Output = "float",
    levels: Sequence[float] | None = None,
    level: int | None = None,
) -> Augmentation:
    """NATIX challenge levels 0-3 (see :mod:`roadwork_cli.data.natix`), mixed by ``levels`` (default uniform)."""
    return NatixAugmentation(preprocessing, output, levels=levels, level=level)
