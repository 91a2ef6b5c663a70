"""Where the forward pass runs and in which precision (``runtime.device``, ``runtime.precision``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from roadwork_cli.errors import UsageError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """The device ``runtime.device`` names, checked to exist here.

    ``auto`` -> CUDA when present, else Apple MPS, else CPU. ``cuda``, ``cuda:N`` and ``mps`` are checked before any
    work starts, because torch only fails on them at the first tensor moved there, with a driver message.

    Raises:
        UsageError: The name is not a device, or it names a GPU this machine does not have (exit 2).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {name!r} is not a device (runtime.device): use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name} asks for a CUDA GPU, but torch sees none on this machine (runtime.device); use "
                "--device cpu, or auto to take a GPU only when there is one."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {name} names GPU {device.index}, but this machine has {count} (cuda:0 to cuda:{count - 1})."
            )
    elif device.type == "mps" and not _mps_available():
        raise UsageError(
            f"--device {name} asks for Apple's MPS, which torch does not have on this machine (runtime.device); use "
            "--device cpu, or auto."
        )
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


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
