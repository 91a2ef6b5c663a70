"""Typed records of the run directory, each read and written here only.

* :class:`CurrentFeatures` (``features/current.json``): which feature cache the later stages use.
* :class:`BestRecord` (``checkpoints/best.json``): the selected epoch, its head config, the backbone it runs on.

The paths are :class:`~roadwork_cli.io.run.RunDir`'s. The training checkpoint (``last.pt``, tensors) has its typed
record beside the loop that writes it (``roadwork_cli.training.artifacts.Checkpoint``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_write_json, read_json
from roadwork_cli.io.run import RunDir

__all__ = ["BestRecord", "CurrentFeatures", "read_best_record", "read_current", "write_best_record", "write_current"]


@dataclass(frozen=True)
class CurrentFeatures:
    """``features/current.json``: the cache folder (fingerprint) the run's later stages read, and its backbone."""

    fingerprint: str
    backbone: str


def read_current(run: RunDir) -> CurrentFeatures | None:
    """The run's current features, or None before any ``cache-features``."""
    if not run.current_features.exists():
        return None
    record = read_json(run.current_features)
    return CurrentFeatures(fingerprint=str(record["fingerprint"]), backbone=str(record.get("backbone", "")))


def write_current(run: RunDir, current: CurrentFeatures) -> None:
    """Make ``current`` the run's features (atomic)."""
    atomic_write_json(run.current_features, asdict(current))


@dataclass(frozen=True)
class BestRecord:
    """``checkpoints/best.json``: what ``calibrate``, ``evaluate``, ``export`` and ``predict`` rebuild the model from.

    Attributes:
        head: The head's constructor arguments (``SelectiveHead.config``).
        backbone: ``{"spec": ..., "fingerprint": ...}``; the spec recreates the backbone (``create_backbone``).
        fingerprint: The features' fingerprint (cached modes; with a precision suffix where reduced), or the merged
            backbone's (``train`` with adapters).
        epoch: The selected epoch (1-based).
        select_metric: The val_select metric epochs were compared on.
        metric: Its value at that epoch (None where undefined).
        val_select: Every val_select metric at that epoch (None where undefined).
        ema: The weights are the EMA's.
        mode: ``"train"`` for the live loop; None (not written) for the cached modes.
        recipe: Live loop: the decode recipe and precision the scores were computed with.
        warm_start: Live loop: the head started from a train_cached head.
        adapters: Live loop with adapters: adapter settings, targets, base and merged fingerprints.
        refit: The head was retrained on train + val_select for ``epoch`` epochs.
        gate: How a ``crossfit`` gate was fitted.
        cls_fit: ``train.cls_fit=logistic_cv``: the logistic regression's C, folds and CV losses.
    """

    head: dict[str, Any]
    backbone: dict[str, Any]
    fingerprint: str
    epoch: int
    select_metric: str
    metric: float | None
    val_select: dict[str, float | None]
    ema: bool
    mode: str | None = None
    recipe: dict[str, Any] | None = None
    warm_start: bool | None = None
    adapters: dict[str, Any] | None = None
    refit: bool | None = None
    gate: str | None = None
    cls_fit: dict[str, Any] | None = None

    _REQUIRED = ("head", "backbone", "fingerprint", "epoch", "select_metric", "metric", "val_select", "ema")

    def to_json(self) -> dict[str, Any]:
        """The JSON object: every required key, the optional ones where set."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in self._REQUIRED or getattr(self, f.name) is not None
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> BestRecord:
        """Read a ``best.json`` object; keys this version does not know are ignored.

        Raises:
            UsageError: A required key is missing (the file is not one ``train`` wrote).
        """
        missing = [key for key in cls._REQUIRED if key not in record]
        if missing:
            raise UsageError(f"checkpoints/best.json lacks {', '.join(missing)}; re-run `roadwork train`.")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})


def read_best_record(run: RunDir) -> BestRecord:
    """The run's ``best.json``.

    Raises:
        UsageError: The run has not been trained.
    """
    return BestRecord.from_json(read_json(run.require(run.best_record, "train")))


def write_best_record(run: RunDir, record: BestRecord) -> None:
    """Write ``best.json`` (atomic); the head's weights are written before it, by training."""
    atomic_write_json(run.best_record, record.to_json())
