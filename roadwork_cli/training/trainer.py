"""``train --mode train_cached | train_crc``: fit the selective head on cached backbone features.

``train_crc`` is the same loop with the conformal-training term added to the objective
(:mod:`roadwork_cli.training.conftr`): each batch simulates the stage-1 calibration on one half and pays for the
simulated thresholds' defer rate and error on exits on the other. Calibration afterwards is the same SCRC-I.

Per epoch every training image contributes one of its cached views (view 0 = clean, 1..K = augmented), chosen with
a generator seeded by ``(train.seed, epoch)``; the order is a seeded permutation too. Features stay in one in-memory
tensor, so an epoch is a gather plus a few hundred small matmuls.

After each epoch the EMA weights (or the raw weights when ``ema_decay`` is 0) are scored on ``val_select``; the best
epoch by ``train.select_metric`` (AURC breaks ties) is written to ``checkpoints/best.safetensors`` +
``checkpoints/best.json``, and everything needed to continue (model, EMA, optimiser, scheduler, RNG states, history)
to ``checkpoints/last.pt``. A re-run after SIGKILL resumes from ``last.pt`` and ends with the same weights as an
uninterrupted run. Finally the best head scores val_select, val_calib and test into ``scores/<split>.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from roadwork_cli.config import Settings, TrainSettings
from roadwork_cli.errors import UsageError
from roadwork_cli.features.cache import CURRENT_FILE, CachedFeatures, SplitTable, load_cached, read_split_table
from roadwork_cli.io import provenance
from roadwork_cli.io.atomic import atomic_path, atomic_write_json, atomic_write_text, json_safe
from roadwork_cli.io.run import RunDir
from roadwork_cli.metrics.classification import accuracy, auroc, mcc
from roadwork_cli.metrics.selective import aurc
from roadwork_cli.model.head import HeadOutput, SelectiveHead, create_head
from roadwork_cli.runtime.device import resolve_device
from roadwork_cli.runtime.distributed import SINGLE_PROCESS, Distributed, distributed_from_env, main_process_only
from roadwork_cli.training.logistic import fit_logistic_cv
from roadwork_cli.training.losses import LOSS_PARTS, ConformalTarget, selective_loss
from roadwork_cli.training.optim import create_ema, create_optimizer, create_scheduler

__all__ = ["SCORE_COLUMNS", "SCORE_SPLITS", "TrainSummary", "evaluate_head", "load_best_head", "train"]

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
_LOWER_IS_BETTER = {"aurc"}


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
    """Split images that failed to decode at ``cache-features`` time (listed in the cache's failed.json): left out
    of training and of the score files, and counted here instead of silently."""
    notes: list[str] = field(default_factory=list)
    """One line per thing the user should know, e.g. why a val_select metric is undefined (NaN)."""

    @classmethod
    def of_run(
        cls, mode: str, train_settings: Any, resumed_from: int, best: dict[str, Any], started: float, **facts: Any
    ) -> TrainSummary:
        """The summary of a finished run from its ``best`` record (epoch, metrics); ``facts`` fill the other fields."""
        ts = train_settings
        return cls(
            mode=mode,
            epochs=ts.epochs,
            epochs_run=ts.epochs - resumed_from,
            resumed_from=resumed_from,
            best_epoch=int(best["epoch"]),
            select_metric=ts.select_metric,
            best_value=float(best["metrics"].get(ts.select_metric, float("nan"))),
            best_metrics=dict(best["metrics"]),
            seconds=time.perf_counter() - started,
            **facts,
        )


# ------------------------------------------------------------------------------------------------------- metrics


LIVE_ONLY = ("optimizer", "accumulate", "head_lr", "adapter_lr", "layer_decay", "grad_clip")
"""Settings of the live fine-tuning loop (``--mode train``) that the cached modes do not use; set, they get a note."""


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


def _score_key(metrics: dict[str, float], select: str) -> tuple[float, float]:
    """Sort key, larger is better: (selection metric, -AURC); NaN ranks lowest."""

    def finite(value: float) -> float:
        return -math.inf if value is None or math.isnan(value) else value

    main = metrics[select]
    main = -main if select in _LOWER_IS_BETTER and not math.isnan(main) else main
    return finite(main), finite(-metrics["aurc"] if not math.isnan(metrics["aurc"]) else float("nan"))


# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class _Data:
    features: torch.Tensor  # (R, D) every cached row
    train_rows: torch.Tensor  # (N, V) row numbers, valid views packed first
    train_counts: torch.Tensor  # (N,) number of valid views
    train_labels: torch.Tensor  # (N,)
    split_ids: dict[str, list[str]]
    split_rows: dict[str, torch.Tensor]
    split_labels: dict[str, torch.Tensor]
    failed: int  # split images that failed to decode at cache time (left out, reported)


def _usable_ids(cached: CachedFeatures, table: SplitTable, run: RunDir) -> dict[str, list[str]]:
    """Per split, the ids that have a clean cached view; images that failed to decode at cache time are left out.

    Raises:
        UsageError: Split images that neither have features nor failed: the cache predates the split.
    """
    usable, stale = {}, 0
    for split in ("train", "val_select", *SCORE_SPLITS[1:]):
        ids = table.ids(split)
        usable[split] = [i for i in ids if 0 in cached.rows.get(i, {})]
        stale += sum(1 for i in ids if 0 not in cached.rows.get(i, {}) and i not in cached.failed)
    if stale:
        raise UsageError(
            f"{stale} image(s) of splits.json have no cached features (the split changed after `cache-features` "
            f"ran); training on the rest would silently drop them. Run `roadwork cache-features --run {run.root}` "
            "first (it computes only the missing ones)."
        )
    if not usable["train"]:
        raise UsageError(
            f"No training image has cached features; run `roadwork cache-features --run {run.root}` first."
        )
    return usable


def _prepare(cached: CachedFeatures, table: SplitTable, device: torch.device, run: RunDir) -> _Data:
    views = max([v for entry in cached.rows.values() for v in entry] or [0])
    usable = _usable_ids(cached, table, run)
    train_ids = usable["train"]
    rows = cached.row_table(train_ids, views)  # (N, V), -1 = missing view
    # Pack the valid rows first so that "view number j < count" indexes only cached views.
    packed = np.sort(np.where(rows < 0, np.iinfo(np.int64).max, rows), axis=1)
    counts = (rows >= 0).sum(axis=1)
    packed = np.where(packed == np.iinfo(np.int64).max, 0, packed)
    split_ids, split_rows, split_labels = {}, {}, {}
    for split in ("val_select", *SCORE_SPLITS[1:]):
        ids = usable[split]
        split_ids[split] = ids
        split_rows[split] = torch.tensor([cached.rows[i][0] for i in ids], dtype=torch.long, device=device)
        split_labels[split] = torch.tensor([table.labels[i] for i in ids], dtype=torch.float32, device=device)
    return _Data(
        features=cached.features.to(device),
        train_rows=torch.from_numpy(packed).to(device),
        train_counts=torch.from_numpy(counts).to(device),
        train_labels=torch.tensor([table.labels[i] for i in train_ids], dtype=torch.float32, device=device),
        split_ids=split_ids,
        split_rows=split_rows,
        split_labels=split_labels,
        failed=sum(1 for ids in table.splits.values() for i in ids if i in cached.failed),
    )


def _epoch_batches(data: _Data, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This epoch's features and labels in shuffled order: one view per image, both chosen from (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = data.train_labels.shape[0]
    order = torch.randperm(n, generator=generator)
    pick = (torch.rand(n, generator=generator) * data.train_counts.cpu()).long()  # (N,) in [0, count)
    device = data.features.device
    order, pick = order.to(device), pick.to(device)
    rows = data.train_rows[order, pick[order]]  # (N,)
    return data.features[rows], data.train_labels[order]  # (N, D), (N,)


@dataclass
class _Fit:
    """One model being trained: head, optimiser, per-step schedule, EMA, and the data and batch size it uses."""

    head: SelectiveHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.nn.Module | None
    data: _Data
    batch_size: int
    steps_per_epoch: int
    conformal: ConformalTarget | None = None
    """train_crc: what the conformal-training term simulates (None in train_cached)."""
    dist: Distributed = SINGLE_PROCESS
    """The torchrun job: each step runs this rank's part of the batch through DDP (one process: all of it)."""


def _new_fit(settings: Settings, data: _Data, in_dim: int, device: torch.device) -> _Fit:
    """A freshly seeded head (standardised on ``data``'s training rows when asked) with its optimiser and EMA."""
    ts = settings.train
    n = int(data.train_labels.shape[0])
    # Small training sets get smaller batches: with one step per epoch the head would stop far from converged.
    batch_size = max(1, min(ts.batch_size, math.ceil(n / ts.min_steps_per_epoch)))
    steps_per_epoch = math.ceil(n / batch_size)
    torch.manual_seed(ts.seed)
    head = create_head(settings.model, in_dim).to(device)
    if head.standardize:
        valid = torch.arange(data.train_rows.shape[1], device=device)[None, :] < data.train_counts[:, None]  # (N, V)
        head.set_standardization(data.features[data.train_rows[valid]])
    optimizer = create_optimizer(head, ts)
    scheduler = create_scheduler(optimizer, ts, steps_per_epoch)
    ema = create_ema(head, ts.ema_decay)
    conformal = ConformalTarget.from_settings(settings) if ts.mode == "train_crc" else None
    dist = distributed_from_env(settings.runtime.device)
    return _Fit(head, optimizer, scheduler, ema, data, batch_size, steps_per_epoch, conformal, dist)


def _train_epoch(fit: _Fit, data: _Data, ts: Any, epoch: int) -> torch.Tensor:
    """One pass over ``data``'s training images; returns the per-part loss sums ``(len(LOSS_PARTS),)``."""
    fit.head.train()
    features, labels = _epoch_batches(data, ts.seed, epoch)
    n = labels.shape[0]
    sums = torch.zeros(len(LOSS_PARTS), device=features.device)
    for step, start in enumerate(range(0, n, fit.batch_size), start=epoch * fit.steps_per_epoch):
        xb, yb = features[start : start + fit.batch_size], labels[start : start + fit.batch_size]
        loss, parts = selective_loss(fit.dist.forward(fit.head, xb), yb, ts.loss, ts.target_coverage, fit.conformal)
        fit.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fit.optimizer.step()
        fit.scheduler.step()
        if fit.ema is not None:
            fit.ema.update(fit.head, step=step)
        sums += torch.stack([parts[p] for p in LOSS_PARTS]) * yb.shape[0]
    return sums


def _with_val_select(data: _Data) -> _Data:
    """``data`` whose training images are train + val_select (val_select contributes its clean view only)."""
    rows = data.split_rows["val_select"]
    extra = torch.zeros(rows.shape[0], data.train_rows.shape[1], dtype=data.train_rows.dtype, device=rows.device)
    extra[:, 0] = rows
    return _Data(
        features=data.features,
        train_rows=torch.cat([data.train_rows, extra]),
        train_counts=torch.cat([data.train_counts, torch.ones_like(rows)]),
        train_labels=torch.cat([data.train_labels, data.split_labels["val_select"]]),
        split_ids=data.split_ids,
        split_rows=data.split_rows,
        split_labels=data.split_labels,
        failed=data.failed,
    )


# ----------------------------------------------------------------------------------------------------- checkpoints


def _signature(settings: Settings, fingerprint: str, data: _Data, table: SplitTable) -> str:
    """Identifies the training problem; last.pt is only resumed when it matches.

    The ordered ids and labels of train and val_select are part of it: after a re-split, "resume after epoch 30"
    would continue a model of other data.
    """
    splits = {
        split: [[i, table.labels[i]] for i in (table.ids("train") if split == "train" else data.split_ids[split])]
        for split in ("train", "val_select")
    }
    payload = {
        "fingerprint": fingerprint,
        "train": settings.train.model_dump(mode="json"),
        "head": [settings.model.head_hidden, settings.model.head_dropout, settings.model.head_standardize]
        + ([settings.model.head_gate] if settings.model.head_gate != "shared" else []),
        "splits": hashlib.sha256(json.dumps(splits).encode()).hexdigest(),
    }
    if settings.train.mode == "train_crc":  # the term simulates these calibration targets
        payload["crc_targets"] = [settings.calibration.fnr, settings.calibration.coverage]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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


@main_process_only
def _save_last(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _out_of_fold_logits(
    settings: Settings, data: _Data, in_dim: int, device: torch.device, epochs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold cls logits ``(N,)`` of ``data``'s training images at feature rows ``(N,)`` (first cached view).

    The training images are dealt into ``train.gate_folds`` seeded folds; for each fold a head is trained with the
    same recipe and epochs on the other folds and scores the fold it never saw: errors that no head fitted.
    """
    ts = settings.train
    n = int(data.train_labels.shape[0])
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(ts.seed)).to(device) % ts.gate_folds  # (N,)
    rows = data.train_rows[:, 0]  # (N,) a cached view of every image (the clean one when there are no others)
    logits = torch.zeros(n, device=device)
    for k in range(ts.gate_folds):
        keep = fold != k
        if keep.all() or not keep.any():
            continue
        part = replace(
            data, train_rows=data.train_rows[keep], train_counts=data.train_counts[keep],
            train_labels=data.train_labels[keep],
        )  # fmt: skip
        fit = _new_fit(settings, part, in_dim, device)
        for epoch in range(epochs):
            _train_epoch(fit, part, ts, epoch)
        model = (fit.ema.module if fit.ema is not None else fit.head).eval()
        with torch.no_grad():
            logits[~keep] = model(data.features[rows[~keep]]).cls.float()
    return rows, logits


GATE_L2 = 0.1
"""L2 penalty on the cross-fitted gate's weights (per mean-BCE unit). A few hundred out-of-fold errors against a few
hundred weights: on demo-like data (efficientnet_lite0, 2000 training images) 0.1 ranked val_select errors better than
1e-2 and 1e-3."""


def fit_crossfit_gate(
    head: SelectiveHead,
    features: torch.Tensor,
    oof_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    seed: int,
) -> float:
    """Fit the ``gate="crossfit"`` head's ``gate_out`` on out-of-fold correctness; returns the final loss.

    The target is whether the stage-1 decision would be right at its operating threshold: SCRC-I sets tau so that
    at most ``alpha`` of exited roadwork falls below it, so on the out-of-fold logits tau is their ``alpha``-quantile
    among roadwork images, and the target is ``(logit >= tau) == label``. (At ``logit >= 0`` instead, the errors are
    those of a threshold the rule never uses.)

    Args:
        head: The trained head (only ``gate_out`` changes; it is re-initialised from ``seed`` first, so a re-run gives
            the same weights).
        features: ``(N, D)`` training features.
        oof_logits: ``(N,)`` cls logits of heads that did not see the image: the gate's logit input and its target.
        labels: ``(N,)`` 0/1.
        alpha: Target false-negative rate among exits (``calibration.fnr``).
        seed: Seed of the re-initialisation.
    """
    head.eval()
    with torch.no_grad():
        hidden = head.hidden_features(features)  # (N, W)
    positives = oof_logits[labels == 1]
    tau = torch.quantile(positives, alpha) if positives.numel() else oof_logits.new_zeros(())
    correct = ((oof_logits >= tau).float() == labels.float()).float()  # (N,)
    torch.manual_seed(seed)
    head.gate_out.reset_parameters()
    optimizer = torch.optim.LBFGS(head.gate_out.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        gate = head.crossfit_gate(hidden, oof_logits)  # (N,)
        loss = F.binary_cross_entropy_with_logits(gate, correct) + GATE_L2 * head.gate_out.weight.square().sum()
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())


def _fit_logistic_cls(
    run: RunDir,
    settings: Settings,
    data: _Data,
    cached: CachedFeatures,
    table: SplitTable,
    device: torch.device,
    dist: Distributed,
) -> torch.Tensor:
    """``train.cls_fit=logistic_cv``: give the best head a cls logit that is an exact, cross-validated L2 logistic
    regression on the clean features of train + val_select (never val_calib); returns val_select's out-of-fold logits.

    The fit set is the linear probe's, so the head ranks at least as well as that probe. Calibration fits its scaling
    on val_select, which the refit has seen; the out-of-fold logits (each from the fold model that did not see the
    image, at the chosen C) are what ``scores/val_select.csv`` holds instead, so the scaling is fit on held-out scores.
    A ``gate="crossfit"`` head's gate is refit on the same out-of-fold logits (the cls it ranks changed).
    """
    ts = settings.train
    train_ids = [i for i in table.ids("train") if 0 in cached.rows.get(i, {})]  # the order of data.train_labels
    rows = torch.cat([torch.tensor([cached.rows[i][0] for i in train_ids], dtype=torch.long, device=device),
                      data.split_rows["val_select"]])  # fmt: skip
    labels = torch.cat([data.train_labels, data.split_labels["val_select"]])  # (N,)
    features = data.features[rows]  # (N, D)
    fit = fit_logistic_cv(features, labels, folds=5, seed=ts.seed)
    head, info = read_best_before_replacing(run, dist)
    linear = SelectiveHead.from_config(dict(head.config, cls="linear"))
    linear.load_state_dict(head.state_dict(), strict=False)  # cls_linear is new (or replaced just below)
    with torch.no_grad():
        linear.cls_linear.weight.copy_(fit.weight[None, :].float())
        linear.cls_linear.bias.fill_(fit.bias)
    linear = linear.to(device)
    if linear.gate == "crossfit":
        oof = fit.oof_logits.to(device)
        fit_crossfit_gate(linear, features, oof, labels, settings.calibration.fnr, ts.seed)
        info["gate"] = f"crossfit on the out-of-fold logits of the {fit.folds}-fold logistic regression"
    info = dict(info, head=linear.config)
    info["cls_fit"] = {
        "method": "logistic_cv", "solver": "lbfgs (float64, full batch)", "C": fit.c, "folds": fit.folds,
        "fit_on": "train+val_select", "cv_log_loss": {f"{c:.4g}": v for c, v in fit.cv_log_loss.items()},
    }  # fmt: skip
    _write_best(run, linear.eval(), info)
    return fit.oof_logits[len(train_ids) :].to(device)


def resume_last(
    path: Path,
    signature: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: torch.nn.Module | None,
    dist: Distributed = SINGLE_PROCESS,
) -> dict[str, Any] | None:
    """Restore a ``last.pt`` written for the same ``signature`` into the objects and the RNGs.

    Under torchrun rank 0 reads the file and sends its state to the other ranks, which need not see rank 0's disk;
    every rank then holds the same weights, optimiser state and RNG state.

    Returns:
        Its state (``epoch``, ``history``, ``best`` and any extra keys), or None to start fresh.
    """
    state = None
    if dist.is_main and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors move to the objects' devices below
    state = dist.broadcast_state(state)
    if state is None or state.get("signature") != signature:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    _set_rng_state(state["rng"])
    return state


def save_last(
    path: Path,
    signature: str,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: torch.nn.Module | None,
    history: list[dict[str, float]],
    best: dict[str, Any],
    **extra: Any,
) -> None:
    """Write ``last.pt`` after epoch ``epoch`` (0-based): everything :func:`resume_last` restores, plus ``extra``."""
    state = {
        "signature": signature,
        "epoch": epoch + 1,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else {},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "history": history,
        "best": best,
    }
    _save_last(path, {**state, **extra})


def select_epoch(
    best: dict[str, Any], metrics: dict[str, float], select_metric: str, epoch: int, has_val: bool
) -> dict[str, Any] | None:
    """The new ``best`` record when epoch ``epoch`` (0-based) beats ``best`` on val_select, else None.

    Without val_select images there is nothing to compare: every epoch beats the previous one (the last one wins).
    """
    key = list(_score_key(metrics, select_metric)) if has_val else [float(epoch), 0.0]
    if best["epoch"] < 0 or key > best["key"]:
        return {"epoch": epoch + 1, "key": key, "metrics": metrics}
    return None


def best_info(base: dict[str, Any], best: dict[str, Any], select_metric: str, ema: bool) -> dict[str, Any]:
    """``best.json`` of the selected epoch: ``base`` (head config, backbone, ...) + epoch, metric and val_select."""
    info = dict(base, epoch=best["epoch"], select_metric=select_metric)
    info["metric"] = json_safe(best["metrics"]).get(select_metric)
    info["val_select"] = json_safe(best["metrics"])
    info["ema"] = ema
    return info


@main_process_only
def _write_best(run: RunDir, head: torch.nn.Module, info: dict[str, Any]) -> None:
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    with atomic_path(run.checkpoints / "best.safetensors") as tmp:
        # One metadata key only: safetensors writes a multi-key map in hash order, which would break byte equality.
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_json(run.checkpoints / "best.json", info)


def read_best_before_replacing(run: RunDir, dist: Distributed) -> tuple[SelectiveHead, dict[str, Any]]:
    """The selected head, read by every rank after rank 0's last write and before rank 0 writes its replacement."""
    dist.barrier()  # rank 0's last best.* is on disk
    head, info = load_best_head(run)
    dist.barrier()  # every rank has read it before rank 0 replaces it
    return head, info


def load_best_head(run: RunDir) -> tuple[SelectiveHead, dict[str, Any]]:
    """The selected head (eval mode) and its ``best.json`` (head config, backbone spec + fingerprint, epoch, metric)."""
    from roadwork_cli.io.atomic import read_json

    info = read_json(run.require(run.checkpoints / "best.json", "train"))
    head = SelectiveHead.from_config(info["head"])
    head.load_state_dict(load_file(str(run.checkpoints / "best.safetensors")))
    return head.eval(), info


@main_process_only
def _write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


@main_process_only
def _write_scores(path: Path, ids: list[str], labels: torch.Tensor, output: HeadOutput) -> None:
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


# ------------------------------------------------------------------------------------------------------------ train


def train(
    run: RunDir,
    settings: Settings,
    progress: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Train the head per ``settings.train`` and write its artifacts.

    Modes ``train_cached`` and ``train_crc`` train on the feature cache here; ``train`` fine-tunes backbone adapters
    on live images in :func:`roadwork_cli.training.finetune.train_live` (same artifacts).

    Args:
        run: Run directory with ``splits.json`` and cached features.
        settings: Resolved :class:`~roadwork_cli.config.Settings`.
        progress: Show a rich progress bar on stderr.
        on_epoch_end: Called as ``fn(epoch, metrics)`` after each epoch's checkpoints are on disk.

    Raises:
        UsageError: No splits, or split images without cached features (trains on those of the last
            ``cache-features``; images that failed to decode there are left out and counted in ``n_failed``).
        StaleError: The inputs of ``cache-features`` changed since it ran.
    """

    if settings.train.mode == "train":  # live images through the adapted backbone: same artifacts, own loop
        from roadwork_cli.training.finetune import train_live

        return train_live(run, settings, progress, on_epoch_end)
    started = time.perf_counter()
    device = resolve_device(settings.runtime.device)
    previous_threads = torch.get_num_threads()
    # The head's matmuls are too small to amortise OpenMP barriers: on CPU one thread is about as fast on an idle
    # machine and many times faster on a busy one (threads spinning at barriers). runtime.threads overrides this.
    threads = settings.runtime.threads or (1 if device.type == "cpu" else previous_threads)
    torch.set_num_threads(threads)
    try:
        return _train(run, settings, device, progress, on_epoch_end, started)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    run: RunDir,
    settings: Settings,
    device: torch.device,
    progress: bool,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    started: float,
) -> TrainSummary:
    from roadwork_cli.io.progress import progress_bar

    mode = settings.train.mode
    provenance.check(run, "cache-features", "cache-features")
    table = read_split_table(run)
    cached = load_cached(run)
    # The features of the last `cache-features` define the backbone (its spec travels into best.json), so a run
    # cached with `--backbone X` trains without repeating the flag; a second backbone needs its own cache-features.
    data = _prepare(cached, table, device, run)
    ts = settings.train
    n_train = int(data.train_labels.shape[0])
    fit = _new_fit(settings, data, cached.feature_dim, device)
    head, optimizer, scheduler, ema = fit.head, fit.optimizer, fit.scheduler, fit.ema
    signature = _signature(settings, cached.fingerprint, data, table)
    head_info = {"head": head.config, "backbone": cached.meta.get("backbone", {}), "fingerprint": cached.fingerprint}

    last_path = run.checkpoints / "last.pt"
    for stale in run.checkpoints.glob(".*.tmp"):  # temp files of a write that SIGKILL interrupted
        stale.unlink(missing_ok=True)
    start_epoch, history = 0, []
    best: dict[str, Any] = {"epoch": -1, "key": [-math.inf, -math.inf], "metrics": {}}
    state = resume_last(last_path, signature, head, optimizer, scheduler, ema, fit.dist)
    if state is not None:
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
    resumed_from = start_epoch

    with progress_bar(f"train ({mode})", total=ts.epochs, unit="epoch", enabled=progress) as advance:
        advance(start_epoch)
        for epoch in range(start_epoch, ts.epochs):
            sums = _train_epoch(fit, data, ts, epoch)
            evaluated = ema.module if ema is not None else head
            evaluated.eval()
            with torch.inference_mode():
                val_rows = data.split_rows["val_select"]
                metrics = evaluate_head(evaluated(data.features[val_rows]), data.split_labels["val_select"])
            losses = (sums / n_train).tolist()
            history.append(epoch_row(epoch, losses, metrics, float(optimizer.param_groups[0]["lr"])))
            selected = select_epoch(best, metrics, ts.select_metric, epoch, has_val=bool(val_rows.numel()))
            if selected is not None:
                best = selected
                _write_best(run, evaluated, best_info(head_info, best, ts.select_metric, ema is not None))
            _write_metrics_csv(run.metrics, history)
            save_last(last_path, signature, epoch, head, optimizer, scheduler, ema, history, best)
            advance(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, metrics)

    if ts.refit and data.split_ids["val_select"] and best["epoch"] > 0:
        # Deterministic from the seed, so a re-run after SIGKILL (or after the end) writes the same weights.
        refit = _new_fit(settings, _with_val_select(data), cached.feature_dim, device)
        for epoch in range(int(best["epoch"])):
            _train_epoch(refit, refit.data, ts, epoch)
        # metric and val_select are those of the selected epoch, before the refit saw val_select
        info = best_info(dict(head_info, refit=True), best, ts.select_metric, ema is not None)
        _write_best(run, (refit.ema.module if refit.ema is not None else refit.head).eval(), info)
    if head.gate == "crossfit" and best["epoch"] > 0 and ts.cls_fit == "sgd":
        # The SGD cls's gate: on the out-of-fold logits of heads trained like it (logistic_cv fits the gate on the
        # logistic regression's own out-of-fold logits below). Deterministic from the seed like the refit, so a
        # re-run after SIGKILL ends with the same gate.
        gate_data = _with_val_select(data) if ts.refit and data.split_ids["val_select"] else data
        rows, oof = _out_of_fold_logits(settings, gate_data, cached.feature_dim, device, int(best["epoch"]))
        best_head, info = read_best_before_replacing(run, fit.dist)
        best_head = best_head.to(device)
        fit_crossfit_gate(
            best_head, gate_data.features[rows], oof, gate_data.train_labels, settings.calibration.fnr, ts.seed
        )
        _write_best(run, best_head.eval(), dict(info, gate=f"crossfit over {ts.gate_folds} folds"))
    oof_select = None
    if ts.cls_fit == "logistic_cv" and best["epoch"] > 0:
        oof_select = _fit_logistic_cls(run, settings, data, cached, table, device, fit.dist)
    fit.dist.barrier()  # rank 0 has written best.safetensors before any rank reads it
    best_head, written = load_best_head(run)
    best_head = best_head.to(device)
    scores = {}
    run.scores.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for split in SCORE_SPLITS:
            output = best_head(data.features[data.split_rows[split]])
            if split == "val_select" and oof_select is not None:
                output = output._replace(cls=oof_select.to(output.cls.dtype))  # held-out scores for the scaling
            scores[split] = run.scores / f"{split}.csv"
            _write_scores(scores[split], data.split_ids[split], data.split_labels[split], output)
    if fit.dist.is_main:
        provenance.record(run, "train", [run.splits, run.features / CURRENT_FILE])
    notes = val_select_notes(data.split_labels["val_select"])
    ignored = [f"train.{name}" for name in LIVE_ONLY if getattr(ts, name) != TrainSettings.model_fields[name].default]
    if ignored:
        notes.append(f"{', '.join(ignored)} apply to --mode train only; {mode} fits the head with AdamW at train.lr.")
    if "cls_fit" in written:
        cls_fit = written["cls_fit"]
        notes.append(
            f"cls: L2 logistic regression, C {cls_fit['C']:.3g} chosen by {cls_fit['folds']}-fold cross-validation on "
            "train + val_select and refit there (train.cls_fit); the val_select metrics are the trained head's at "
            "its selected epoch, and scores/val_select.csv holds out-of-fold cls scores."
        )
    if data.failed:
        notes.append(
            f"{data.failed} split image(s) failed to decode at cache-features time and are left out of training and "
            f"of the score files (reasons in {run.features / cached.fingerprint / 'failed.json'})."
        )
    return TrainSummary.of_run(
        mode,
        ts,
        resumed_from,
        best,
        started,
        fingerprint=cached.fingerprint,
        backbone=str(cached.meta.get("backbone", {}).get("name", "?")),
        n_train=n_train,
        n_val_select=len(data.split_ids["val_select"]),
        scores=scores,
        n_failed=data.failed,
        notes=notes,
    )
