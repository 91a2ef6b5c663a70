"""What training writes and reads back, for every mode: the summary, epoch selection, the best and last checkpoints,
``metrics.csv`` and the score files.

Paths are :class:`~roadwork_cli.io.run.RunDir`'s; ``best.json`` is :class:`~roadwork_cli.io.records.BestRecord`;
``last.pt`` is :class:`Checkpoint` (tensors and JSON types only, read with ``weights_only=True``). Under torchrun the
writers run on rank 0 only (:func:`~roadwork_cli.runtime.distributed.main_process_only`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from roadwork_cli.config import TrainSettings
from roadwork_cli.io.atomic import atomic_path, atomic_write_text, json_safe
from roadwork_cli.io.records import BestRecord, read_best_record, write_best_record
from roadwork_cli.io.run import RunDir
from roadwork_cli.metrics.classification import accuracy, auroc, mcc
from roadwork_cli.metrics.selective import aurc
from roadwork_cli.model.head import HeadOutput, SelectiveHead
from roadwork_cli.runtime.distributed import SINGLE_PROCESS, Distributed, main_process_only
from roadwork_cli.training.losses import LOSS_PARTS

__all__ = [
    "METRIC_COLUMNS",
    "SCORE_COLUMNS",
    "SCORE_SPLITS",
    "Checkpoint",
    "Selection",
    "TrainSummary",
    "epoch_row",
    "evaluate_head",
    "load_best_head",
    "read_best_before_replacing",
    "resume_checkpoint",
    "save_checkpoint",
    "training_signature",
    "val_select_notes",
    "write_best",
    "write_metrics_csv",
    "write_scores",
]

SCORE_SPLITS = ("val_select", "val_calib", "test")
SCORE_COLUMNS = ("id", "label", "p_roadwork", "gate", "logit_cls", "logit_gate", "logit_aux")
METRIC_COLUMNS = (
    "epoch",
    *(f"loss_{part}" if part != "total" else "loss" for part in LOSS_PARTS),
    "val_accuracy",
    "val_mcc",
    "val_auroc",
    "val_aurc",
    "val_coverage",
    "lr",
)
LOWER_IS_BETTER = {"aurc"}


@dataclass
class TrainSummary:
    """What ``train`` did (the CLI renders it as a table)."""

    mode: str
    epochs: int
    epochs_run: int
    resumed_from: int
    best_epoch: int
    select_metric: str
    best_value: float
    best_metrics: dict[str, float]
    fingerprint: str
    backbone: str
    n_train: int
    n_val_select: int
    seconds: float
    scores: dict[str, Path] = field(default_factory=dict)
    n_failed: int = 0
    """Split images left out of training and of the score files because they could not be read: at
    ``cache-features`` time in the cached modes (the cache's failed.json), while decoding in ``--mode train``."""
    notes: list[str] = field(default_factory=list)
    """One line per thing the user should know, e.g. why a val_select metric is undefined (NaN)."""

    @classmethod
    def of_run(
        cls,
        mode: str,
        train_settings: TrainSettings,
        resumed_from: int,
        best: Selection,
        started: float,
        **facts: Any,
    ) -> TrainSummary:
        """The summary of a finished run from its selection (epoch, metrics); ``facts`` fill the other fields."""
        ts = train_settings
        return cls(
            mode=mode,
            epochs=ts.epochs,
            epochs_run=ts.epochs - resumed_from,
            resumed_from=resumed_from,
            best_epoch=best.epoch,
            select_metric=ts.select_metric,
            best_value=float(best.metrics.get(ts.select_metric, float("nan"))),
            best_metrics=dict(best.metrics),
            seconds=time.perf_counter() - started,
            **facts,
        )


# ------------------------------------------------------------------------------------------------------- metrics


def evaluate_head(output: HeadOutput, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, MCC, AUROC, AURC (gate as selection score) and coverage at gate 0.5 of one split.

    Undefined values are NaN without warnings: every metric on an empty split, AUROC on a one-class split
    (:func:`val_select_notes` says why in words).
    """
    y = labels.cpu().numpy().astype(int)
    if y.size == 0:
        nan = float("nan")
        return {"accuracy": nan, "mcc": nan, "auroc": nan, "aurc": nan, "coverage": nan}
    p = torch.sigmoid(output.cls.float()).cpu().numpy()
    gate = torch.sigmoid(output.gate.float()).cpu().numpy()
    pred = (p >= 0.5).astype(int)
    return {
        "accuracy": accuracy(y, pred),
        "mcc": mcc(y, pred),
        "auroc": auroc(y, p),
        "aurc": aurc(gate, (pred != y).astype(float)),
        "coverage": float((gate >= 0.5).mean()),
    }


def val_select_notes(labels: torch.Tensor) -> list[str]:
    """Why val_select metrics are undefined or weak, in words (empty: nothing to say)."""
    n, positives = int(labels.numel()), int(labels.sum().item()) if labels.numel() else 0
    if n == 0:
        return [
            "val_select is empty: no epoch selection (the last epoch is kept) and every val_select metric is n/a; "
            "give val_select a share in data.fractions and re-run `roadwork split`."
        ]
    if positives in (0, n):
        kind = "roadwork" if positives == n else "no_roadwork"
        return [
            f"val_select holds only {kind} images ({n}): AUROC is undefined (n/a) and MCC is 0 by convention; "
            "epochs are compared on what remains defined. Re-split with more images for a meaningful selection."
        ]
    return []


def epoch_row(epoch: int, losses: list[float], metrics: dict[str, float], lr: float) -> dict[str, float]:
    """One ``metrics.csv`` row (columns of ``METRIC_COLUMNS``): mean loss parts, val_select metrics, learning rate."""
    row: dict[str, float] = {"epoch": epoch + 1}
    row.update({("loss" if p == "total" else f"loss_{p}"): v for p, v in zip(LOSS_PARTS, losses, strict=True)})
    row.update({f"val_{k}": v for k, v in metrics.items()})
    row["lr"] = lr
    return row


# ------------------------------------------------------------------------------------------------ epoch selection


def _score_key(metrics: dict[str, float], select: str) -> list[float]:
    """Sort key, larger is better: (selection metric, -AURC); NaN ranks lowest."""

    def finite(value: float) -> float:
        return -math.inf if value is None or math.isnan(value) else value

    main = metrics[select]
    main = -main if select in LOWER_IS_BETTER and not math.isnan(main) else main
    return [finite(main), finite(-metrics["aurc"] if not math.isnan(metrics["aurc"]) else float("nan"))]


@dataclass(frozen=True)
class Selection:
    """The best epoch so far (``epoch`` 1-based; 0 before the first), its sort key and its val_select metrics."""

    epoch: int = -1
    key: list[float] = field(default_factory=lambda: [-math.inf, -math.inf])
    metrics: dict[str, float] = field(default_factory=dict)

    def after(self, epoch: int, metrics: dict[str, float], select_metric: str, has_val: bool) -> Selection | None:
        """The new selection when epoch ``epoch`` (0-based) beats this one on val_select, else None.

        Without val_select images there is nothing to compare: every epoch beats the previous one (the last wins).
        """
        key = _score_key(metrics, select_metric) if has_val else [float(epoch), 0.0]
        if self.epoch < 0 or key > self.key:
            return Selection(epoch + 1, key, metrics)
        return None

    def record(self, select_metric: str, ema: bool, **facts: Any) -> BestRecord:
        """``best.json`` of this epoch; ``facts`` are the record's other fields (head, backbone, fingerprint...)."""
        metrics = json_safe(self.metrics)
        return BestRecord(
            epoch=self.epoch, select_metric=select_metric, metric=metrics.get(select_metric), val_select=metrics,
            ema=ema, **facts,
        )  # fmt: skip

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "key": list(self.key), "metrics": dict(self.metrics)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Selection:
        return cls(int(state["epoch"]), list(state["key"]), dict(state["metrics"]))


# -------------------------------------------------------------------------------------------------- best and scores


@main_process_only
def write_best(run: RunDir, head: torch.nn.Module, record: BestRecord) -> None:
    """The selected head's weights, then its record (so a record never names weights not yet on disk)."""
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.best_weights) as tmp:
        # One metadata key only: safetensors writes a multi-key map in hash order, which would break byte equality.
        save_file(weights, str(tmp), metadata={"format": "pt"})
    write_best_record(run, record)


def load_best_head(run: RunDir) -> tuple[SelectiveHead, BestRecord]:
    """The selected head (eval mode) and its record (head config, backbone spec + fingerprint, epoch, metric)."""
    record = read_best_record(run)
    head = SelectiveHead.from_config(record.head)
    head.load_state_dict(load_file(str(run.best_weights)))
    return head.eval(), record


def read_best_before_replacing(run: RunDir, dist: Distributed) -> tuple[SelectiveHead, BestRecord]:
    """The selected head, read by every rank after rank 0's last write and before rank 0 writes its replacement."""
    dist.barrier()  # rank 0's last best.* is on disk
    head, record = load_best_head(run)
    dist.barrier()  # every rank has read it before rank 0 replaces it
    return head, record


@main_process_only
def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    """``metrics.csv``: one row per epoch (:data:`METRIC_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


@main_process_only
def write_scores(path: Path, ids: list[str], labels: torch.Tensor, output: HeadOutput) -> None:
    """One split's raw scores (:data:`SCORE_COLUMNS`): what ``calibrate`` and ``evaluate`` read."""
    columns = [
        torch.sigmoid(output.cls).tolist(),
        torch.sigmoid(output.gate).tolist(),
        output.cls.tolist(),
        output.gate.tolist(),
        output.aux.tolist(),
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for i, image_id in enumerate(ids):
        writer.writerow([image_id, int(labels[i].item()), *(f"{c[i]:.9g}" for c in columns)])
    atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------------ resume


def training_signature(
    train_settings: TrainSettings, fingerprint: str, splits: dict[str, list[list[Any]]], **facts: Any
) -> str:
    """Identifies a training problem; ``last.pt`` is resumed only when its signature matches.

    Args:
        train_settings: ``settings.train``.
        fingerprint: The features' (cached modes) or the base backbone's (live loop).
        splits: ``[[id, label], ...]`` of train and val_select in order: after a re-split, "resume after epoch 30"
            would continue a model of other data.
        **facts: What else the loop's result depends on (head shape, adapters, augmentation, decode recipe...).
    """
    payload = {
        "fingerprint": fingerprint,
        "train": train_settings.model_dump(mode="json"),
        "splits": hashlib.sha256(json.dumps(splits).encode()).hexdigest(),
        **facts,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on the GPU draws from its generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class Checkpoint:
    """``last.pt``: everything a re-run needs to continue after epoch ``epoch`` exactly as if never stopped.

    Attributes:
        signature: :func:`training_signature` of the problem it belongs to.
        epoch: Epochs done.
        history: The ``metrics.csv`` rows so far.
        best: The selection so far.
        extra: Loop-specific state (the live loop's gradient scaler and unreadable images).
    """

    signature: str
    epoch: int
    history: list[dict[str, float]]
    best: Selection
    extra: dict[str, Any] = field(default_factory=dict)


@main_process_only
def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_checkpoint(
    run: RunDir,
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: torch.nn.Module | None,
) -> None:
    """Write ``last.pt``: ``checkpoint``, the objects' states and the RNG states."""
    state = {
        "signature": checkpoint.signature,
        "epoch": checkpoint.epoch,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else {},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "history": checkpoint.history,
        "best": checkpoint.best.state(),
    }
    _save(run.last_checkpoint, {**state, **checkpoint.extra})


_STATE_KEYS = {"signature", "epoch", "model", "ema", "optimizer", "scheduler", "rng", "history", "best"}


def resume_checkpoint(
    run: RunDir,
    signature: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: torch.nn.Module | None,
    dist: Distributed = SINGLE_PROCESS,
) -> Checkpoint | None:
    """Restore a ``last.pt`` written for the same ``signature`` into the objects and the RNGs.

    Under torchrun rank 0 reads the file and sends its state to the other ranks, which need not see rank 0's disk;
    every rank then holds the same weights, optimiser state and RNG state.

    Returns:
        The checkpoint (epochs done, history, selection, extra state), or None to start fresh.
    """
    state = None
    if dist.is_main and run.last_checkpoint.exists():
        # Tensors move to the objects' devices below.
        state = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    state = dist.broadcast_state(state)
    if state is None or state.get("signature") != signature:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    _set_rng_state(state["rng"])
    return Checkpoint(
        signature=signature,
        epoch=int(state["epoch"]),
        history=list(state["history"]),
        best=Selection.from_state(state["best"]),
        extra={key: value for key, value in state.items() if key not in _STATE_KEYS},
    )
