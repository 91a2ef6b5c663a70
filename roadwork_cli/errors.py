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
