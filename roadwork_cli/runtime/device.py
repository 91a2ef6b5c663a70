"""Where the forward pass runs and in which precision (``runtime.device``, ``runtime.precision``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else Apple MPS, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``auto`` picks bf16 on CUDA devices that support it and fp32 elsewhere. On CPUs with AVX-512 BF16 autocast is
    faster (1.7x for the default backbone on the machine of benchmarks/RESULTS.md) but it changed 2 of 217 certified
    test decisions there, and the guarantee is certified on the scores calibration saw, so ``auto`` stays fp32 on CPU.
    fp16 without loss scaling is only safe for inference, so it is never chosen silently.
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision not in _DTYPES:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return _DTYPES[precision]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing for fp32."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def precision_tag(dtype: torch.dtype | None) -> str:
    """Short name of a compute dtype for fingerprints and metadata: ``fp32``, ``bf16`` or ``fp16``."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
