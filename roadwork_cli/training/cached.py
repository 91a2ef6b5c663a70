"""``train --mode train_cached | train_crc``: fit the selective head on cached backbone features.

``train_crc`` is the same loop with the conformal-training term added to the objective
(:mod:`roadwork_cli.training.conftr`): each batch simulates the stage-1 calibration on one half and pays for the
simulated thresholds' defer rate and error on exits on the other. Calibration afterwards is the same SCRC-I.

Per epoch every training image contributes one of its cached views (view 0 = clean, 1..K = augmented), chosen with
a generator seeded by ``(train.seed, epoch)``; the order is a seeded permutation too. Features stay in one in-memory
tensor, so an epoch is a gather plus a few hundred small matmuls.

The epochs run in the skeleton both loops share (:mod:`roadwork_cli.training.epochs`: selection on val_select,
``checkpoints/best.*``, ``last.pt`` and resume, ``scores/<split>.csv``). What is particular to this loop comes after
the epochs: the optional refit on train + val_select, the cross-validated logistic regression that gives the head's
cls output (``train.cls_fit``), and the gate fit on the out-of-fold errors of the cls it is paired with. They build
two heads (:func:`_selection_and_final`): one fit on train alone, which scores val_select (the scores calibration
fits its scaling and score choice on are all held out), and the final one (``best.*``), which scores val_calib and
test.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from roadwork_cli.config import Settings, TrainSettings, mode_notes
from roadwork_cli.errors import UsageError
from roadwork_cli.features.cache import CachedFeatures, SplitTable, load_cached, read_split_table
from roadwork_cli.io import provenance
from roadwork_cli.io.run import RunDir
from roadwork_cli.model.head import HeadOutput, SelectiveHead, create_head
from roadwork_cli.runtime.distributed import SINGLE_PROCESS, Distributed, distributed_from_env
from roadwork_cli.training.artifacts import (
    SCORE_SPLITS,
    TrainSummary,
    evaluate_head,
    load_best_head,
    read_best_before_replacing,
    training_signature,
    val_select_notes,
    write_best,
)
from roadwork_cli.training.epochs import EpochLoop, run_epochs, write_split_scores
from roadwork_cli.training.logistic import LogisticFit, fit_logistic_cv
from roadwork_cli.training.losses import LOSS_PARTS, ConformalTarget, selective_loss
from roadwork_cli.training.optim import create_ema, create_optimizer, create_scheduler

__all__ = ["GATE_L2", "fit_crossfit_gate", "train_cached"]


# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class _Data:
    features: torch.Tensor  # (R, D) every cached row
    train_rows: torch.Tensor  # (N, V) row numbers, valid views packed first
    train_counts: torch.Tensor  # (N,) number of valid views
    train_labels: torch.Tensor  # (N,)
    train_clean: torch.Tensor  # (N,) row of each training image's clean view (view 0)
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
        train_clean=torch.tensor([cached.rows[i][0] for i in train_ids], dtype=torch.long, device=device),
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


def _train_epoch(fit: _Fit, data: _Data, ts: TrainSettings, epoch: int) -> torch.Tensor:
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
        train_clean=torch.cat([data.train_clean, rows]),
        split_ids=data.split_ids,
        split_rows=data.split_rows,
        split_labels=data.split_labels,
        failed=data.failed,
    )


# ---------------------------------------------------------------------------------------------- after the epochs


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
            train_labels=data.train_labels[keep], train_clean=data.train_clean[keep],
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


def _gate_targets(oof_logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(N,)`` 1 where the stage-1 decision on the out-of-fold logit is right at the operating threshold.

    SCRC-I sets tau so that at most ``alpha`` of exited roadwork falls below it, so on the out-of-fold logits tau is
    their ``alpha``-quantile among roadwork images. (At ``logit >= 0`` instead, the errors are those of a threshold
    the rule never uses.)
    """
    positives = oof_logits[labels == 1]
    tau = torch.quantile(positives, alpha) if positives.numel() else oof_logits.new_zeros(())
    return ((oof_logits >= tau).float() == labels.float()).float()


def _fit_gate_layer(layer: torch.nn.Linear, inputs: torch.Tensor, correct: torch.Tensor, seed: int) -> float:
    """Re-initialise ``layer`` (1 output) from ``seed`` and fit it by L-BFGS to ``correct``; returns the final loss."""
    torch.manual_seed(seed)
    layer.reset_parameters()
    inputs = inputs.detach()
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        gate = layer(inputs)[:, 0]  # (N,)
        loss = F.binary_cross_entropy_with_logits(gate, correct) + GATE_L2 * layer.weight.square().sum()
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())


def fit_crossfit_gate(
    head: SelectiveHead,
    features: torch.Tensor,
    oof_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    seed: int,
) -> float:
    """Fit the head's gate on out-of-fold correctness of the cls it is paired with; returns the final loss.

    ``gate="crossfit"``: ``gate_out`` on the hidden features, the cls logit and its magnitude. ``gate="shared"``
    (under ``train.cls_fit=logistic_cv``, whose cls replaced the one the shared gate was trained beside): the gate
    row of the shared output layer, on the hidden features. The target is whether the stage-1 decision would be right
    at its operating threshold (:func:`_gate_targets`).

    Args:
        head: The trained head (only the gate's layer changes; it is re-initialised from ``seed`` first, so a re-run
            gives the same weights).
        features: ``(N, D)`` features of the images the out-of-fold logits belong to.
        oof_logits: ``(N,)`` cls logits of models that did not see the image: the gate's logit input and its target.
        labels: ``(N,)`` 0/1.
        alpha: Target false-negative rate among exits (``calibration.fnr``).
        seed: Seed of the re-initialisation.
    """
    head.eval()
    with torch.no_grad():
        hidden = head.hidden_features(features)  # (N, W)
    correct = _gate_targets(oof_logits, labels, alpha)  # (N,)
    if head.gate == "crossfit":
        z = oof_logits.detach()[:, None]  # (N, 1): the inputs of head.crossfit_gate
        return _fit_gate_layer(head.gate_out, torch.cat([hidden, z, z.abs()], dim=1), correct, seed)
    row = torch.nn.Linear(hidden.shape[1], 1).to(hidden.device)
    loss = _fit_gate_layer(row, hidden, correct, seed)
    with torch.no_grad():
        head.out.weight[1].copy_(row.weight[0])
        head.out.bias[1].copy_(row.bias[0])
    return loss


def _with_logistic_cls(head: SelectiveHead, fit: LogisticFit) -> SelectiveHead:
    """A copy of ``head`` whose cls logit is the logistic regression ``fit`` (``cls="linear"``); the rest unchanged."""
    linear = SelectiveHead.from_config(dict(head.config, cls="linear"))
    linear.load_state_dict(head.state_dict(), strict=False)  # cls_linear is new (or replaced just below)
    with torch.no_grad():
        linear.cls_linear.weight.copy_(fit.weight[None, :].float())
        linear.cls_linear.bias.fill_(fit.bias)
    return linear


@dataclass
class _GateFit:
    """What a gate is fit on: features of the train images and the out-of-fold cls logits whose errors it ranks."""

    features: torch.Tensor  # (N, D)
    oof_logits: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    how: str
    """``best.json``'s ``gate``."""


def _assemble(
    trunk: SelectiveHead, cls: LogisticFit | None, gate: _GateFit | None, settings: Settings, device: torch.device
) -> SelectiveHead:
    """A copy of ``trunk`` with the logistic cls ``cls`` (if any) and its gate refit on ``gate`` (if any)."""
    head = _with_logistic_cls(trunk, cls) if cls is not None else copy.deepcopy(trunk)
    head = head.to(device)
    if gate is not None:
        fit_crossfit_gate(
            head, gate.features, gate.oof_logits, gate.labels, settings.calibration.fnr, settings.train.seed
        )
    return head.eval()


def _selected_head(
    run: RunDir, settings: Settings, data: _Data, in_dim: int, device: torch.device, dist: Distributed, epochs: int
) -> SelectiveHead:
    """The head of the selected epoch (fit on train only), as the epochs left it in ``best.*``.

    A re-run after the refit replaced ``best.*`` (SIGKILL before the scores were written) trains it again: the same
    seeded recipe for the selected number of epochs, so the same weights. Whatever else an earlier run's stages put
    in ``best.*`` (a logistic cls, a refit gate) is replaced again below from the same seeds.
    """
    head, record = read_best_before_replacing(run, dist)
    if record.refit:
        fit = _new_fit(settings, data, in_dim, device)
        for epoch in range(epochs):
            _train_epoch(fit, data, settings.train, epoch)
        head = fit.ema.module if fit.ema is not None else fit.head
    return head.to(device).eval()


def _selection_and_final(
    run: RunDir, settings: Settings, data: _Data, in_dim: int, device: torch.device, dist: Distributed, epochs: int
) -> tuple[SelectiveHead, SelectiveHead, dict[str, Any]]:
    """The two heads after the epochs: the one that scores val_select and the final one (``best.*``).

    The selection head is the whole pipeline fit on train alone: the selected epoch's head, the logistic cls fit on
    train (``train.cls_fit=logistic_cv``), its gate fit on train's out-of-fold errors. No part of it saw a val_select
    image, so the scaling, the threshold grid and ``gate_score: auto`` that calibration fits on its val_select scores
    are fit on held-out scores. The final head is the same pipeline where the settings add val_select to a fit (the
    refit's trunk, the logistic cls); its gate is fit on the same out-of-fold errors of train, on its own trunk. It
    scores val_calib and test, which no fit saw.

    Returns:
        ``(selection head, final head, best.json fields: refit / gate / cls_fit)``.
    """
    ts = settings.train
    has_select = bool(data.split_ids["val_select"])
    selected = _selected_head(run, settings, data, in_dim, device, dist, epochs)
    train_x = data.features[data.train_clean]  # (N, D)
    cls_select = cls_final = gate = None
    fields: dict[str, Any] = {}
    if ts.cls_fit == "logistic_cv":
        cls_select = fit_logistic_cv(train_x, data.train_labels, folds=5, seed=ts.seed)
        cls_final = cls_select
        if has_select:
            rows = data.split_rows["val_select"]
            features = torch.cat([train_x, data.features[rows]])
            labels = torch.cat([data.train_labels, data.split_labels["val_select"]])
            cls_final = fit_logistic_cv(features, labels, folds=5, seed=ts.seed)
        kind = "crossfit" if selected.gate == "crossfit" else "shared gate output refit"
        how = f"{kind} on the out-of-fold logits of the {cls_select.folds}-fold logistic regression on train"
        gate = _GateFit(train_x, cls_select.oof_logits.to(device), data.train_labels, how)
        fields["cls_fit"] = {
            "method": "logistic_cv", "solver": "lbfgs (float64, full batch)", "C": cls_final.c,
            "folds": cls_final.folds, "fit_on": "train+val_select" if has_select else "train",
            "cv_log_loss": {f"{c:.4g}": v for c, v in cls_final.cv_log_loss.items()},
            "val_select_scores": {"fit_on": "train", "C": cls_select.c},
        }  # fmt: skip
    elif selected.gate == "crossfit":
        # The SGD cls's gate: on the out-of-fold logits of heads trained like it on folds of train.
        rows, oof = _out_of_fold_logits(settings, data, in_dim, device, epochs)
        gate = _GateFit(data.features[rows], oof, data.train_labels, f"crossfit over {ts.gate_folds} folds")
    if gate is not None:
        fields["gate"] = gate.how
    select_head = _assemble(selected, cls_select, gate, settings, device)
    trunk = selected
    if ts.refit and has_select:
        # Deterministic from the seed, so a re-run after SIGKILL (or after the end) writes the same weights.
        refit = _new_fit(settings, _with_val_select(data), in_dim, device)
        for epoch in range(epochs):
            _train_epoch(refit, refit.data, ts, epoch)
        trunk = (refit.ema.module if refit.ema is not None else refit.head).eval()
        fields["refit"] = True
    final = (
        select_head
        if trunk is selected and cls_final is cls_select
        else _assemble(trunk, cls_final, gate, settings, device)
    )
    return select_head, final, fields


# ------------------------------------------------------------------------------------------------------------ train


def _signature(settings: Settings, fingerprint: str, data: _Data, table: SplitTable) -> str:
    """The training problem: features, train settings, head shape, the ordered train and val_select labels."""
    splits = {
        split: [[i, table.labels[i]] for i in (table.ids("train") if split == "train" else data.split_ids[split])]
        for split in ("train", "val_select")
    }
    model = settings.model
    facts: dict[str, Any] = {
        "head": [model.head_hidden, model.head_dropout, model.head_standardize]
        + ([model.head_gate] if model.head_gate != "shared" else []),
    }
    if settings.train.mode == "train_crc":  # the term simulates these calibration targets
        facts["crc_targets"] = [settings.calibration.fnr, settings.calibration.coverage]
    return training_signature(settings.train, fingerprint, splits, **facts)


def train_cached(
    run: RunDir,
    settings: Settings,
    device: torch.device,
    progress: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """``train --mode train_cached | train_crc``: fit the head on the run's current feature cache.

    The features of the last ``cache-features`` define the backbone (its spec travels into ``best.json``), so a run
    cached with ``--backbone X`` trains without repeating the flag; a second backbone needs its own cache-features.

    Raises:
        UsageError: Split images without cached features (images that failed to decode at ``cache-features`` time
            are left out and counted in ``n_failed``).
        StaleError: The inputs of ``cache-features`` changed since it ran.
    """
    started = time.perf_counter()
    mode = settings.train.mode
    provenance.check(run, "cache-features", "cache-features")
    table = read_split_table(run)
    cached = load_cached(run)
    data = _prepare(cached, table, device, run)
    ts = settings.train
    n_train = int(data.train_labels.shape[0])
    fit = _new_fit(settings, data, cached.feature_dim, device)
    head, ema = fit.head, fit.ema

    def train_epoch(epoch: int, advance: Any) -> tuple[torch.Tensor, int]:
        return _train_epoch(fit, data, ts, epoch), n_train

    def validate(evaluated: torch.nn.Module) -> tuple[dict[str, float], bool]:
        evaluated.eval()
        val_rows = data.split_rows["val_select"]
        with torch.inference_mode():
            metrics = evaluate_head(evaluated(data.features[val_rows]), data.split_labels["val_select"])
        return metrics, bool(val_rows.numel())

    facts = {"head": head.config, "backbone": cached.meta.get("backbone", {}), "fingerprint": cached.fingerprint}
    loop = EpochLoop(
        run, mode, ts.epochs, ts.select_metric, _signature(settings, cached.fingerprint, data, table), head,
        fit.optimizer, fit.scheduler, ema, fit.dist, train_epoch, validate,
        lambda evaluated, record: write_best(run, evaluated, record), facts,
    )  # fmt: skip
    epochs = run_epochs(loop, progress, on_epoch_end)
    best = epochs.best

    select_head = None
    if best.epoch > 0:
        select_head, final, fields = _selection_and_final(
            run, settings, data, cached.feature_dim, device, fit.dist, best.epoch
        )
        if fields:  # something replaced the selected epoch's head; its metric and val_select are still those
            write_best(
                run, final, best.record(ts.select_metric, ema is not None, **{**facts, "head": final.config}, **fields)
            )
    fit.dist.barrier()  # rank 0 has written best.safetensors before any rank reads it
    best_head, written = load_best_head(run)
    best_head = best_head.to(device)

    def score(split: str) -> tuple[list[str], torch.Tensor, HeadOutput]:
        # val_select: the pipeline fit on train alone (no fit saw these images); val_calib, test: the final head.
        model = select_head if split == "val_select" and select_head is not None else best_head
        with torch.inference_mode():
            output = model(data.features[data.split_rows[split]])
        return data.split_ids[split], data.split_labels[split], output

    scores = write_split_scores(run, fit.dist, score, [run.splits, run.current_features])
    notes = val_select_notes(data.split_labels["val_select"])
    notes += mode_notes(settings)  # settings this mode ignores (model.peft.*, live-loop train.*), by name
    if written.cls_fit is not None:
        cls_fit = written.cls_fit
        notes.append(
            f"cls: L2 logistic regression, C {cls_fit['C']:.3g} chosen by {cls_fit['folds']}-fold cross-validation on "
            f"{cls_fit['fit_on'].replace('+', ' + ')} and refit there (train.cls_fit); the val_select metrics are the "
            "trained head's at its selected epoch."
        )
    if written.cls_fit is not None or written.refit:
        notes.append(
            "scores/val_select.csv holds the scores of the same pipeline fit on train alone (no model that scored a "
            "val_select image saw it), so calibration's scaling and score choice are fit on held-out scores; "
            "val_calib and test are scored by the final head."
        )
    if data.failed:
        notes.append(
            f"{data.failed} split image(s) failed to decode at cache-features time and are left out of training and "
            f"of the score files (reasons in {run.feature_cache(cached.fingerprint) / 'failed.json'})."
        )
    return TrainSummary.of_run(
        mode,
        ts,
        epochs.resumed_from,
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
