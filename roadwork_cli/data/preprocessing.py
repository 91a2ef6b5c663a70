"""A backbone's input recipe, importable without torch (the ONNX runtime path preprocesses with PIL and numpy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone.

    Attributes:
        size: Square input side in pixels.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by.
        interpolation: Resize filter name (``bicubic``, ``bilinear``, ...).
        crop_pct: Fraction of the resized shorter side kept by the centre crop (1.0 = no border dropped).
    """

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        data = asdict(self)
        data["mean"] = [float(v) for v in self.mean]
        data["std"] = [float(v) for v in self.std]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            size=int(data["size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data.get("interpolation", "bicubic")),
            crop_pct=float(data.get("crop_pct", 1.0)),
        )
