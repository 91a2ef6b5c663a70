"""The epoch skeleton both training loops share (cached features and live images).

Per epoch: the loop's training pass, then the EMA weights (or the raw ones) are scored on val_select, a
``metrics.csv`` row is added, a better epoch by ``train.select_metric`` (AURC breaks ties) is written to
``checkpoints/best.*``, and ``last.pt`` records everything needed to continue. A re-run finds ``last.pt`` (same
signature) and resumes after its epoch with the same weights, optimiser, scheduler, EMA and RNG states, so it ends
with the bytes an uninterrupted run ends with. At the end the selected model scores val_select, val_calib and test
into ``scores/<split>.csv``.

What differs between the loops comes in as callables of :class:`EpochLoop`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from roadwork_cli.io import provenance
from roadwork_cli.io.progress import progress_bar
from roadwork_cli.io.records import BestRecord
from roadwork_cli.io.run import RunDir
from roadwork_cli.model.head import HeadOutput
from roadwork_cli.runtime.distributed import Distributed
from roadwork_cli.training.artifacts import (
    SCORE_SPLITS,
    Checkpoint,
    Selection,
    epoch_row,
    resume_checkpoint,
    save_checkpoint,
    write_metrics_csv,
    write_scores,
)

__all__ = ["EpochLoop", "Epochs", "run_epochs", "write_split_scores"]

Advance = Callable[..., None]


def _no_progress(*_: Any, **__: Any) -> None:
    return None


@dataclass
class EpochLoop:
    """One loop's parts, as the skeleton calls them.

    Attributes:
        run: The run directory.
        mode: ``train.mode`` (progress label).
        epochs: ``train.epochs``.
        select_metric: ``train.select_metric``.
        signature: Identifies the problem (:func:`~roadwork_cli.training.artifacts.training_signature`).
        model: What ``last.pt`` saves (head, or backbone + head).
        optimizer: Its optimiser.
        scheduler: Its per-step scheduler.
        ema: Its EMA copy, or None.
        dist: The torchrun job (one process: a no-op).
        train_epoch: ``fn(epoch, advance) -> (loss-part sums, images used)``: one pass over the training images.
        validate: ``fn(evaluated model) -> (val_select metrics, whether val_select had images)``.
        write_best: ``fn(evaluated model, record)``: writes ``best.*`` (rank 0).
        best_facts: The best record's fields besides the selection's (head, backbone, fingerprint, ...).
        images_per_epoch: Live loop: one progress bar per epoch over this many images; None: one bar over epochs.
        extra_state: Loop-specific state saved in ``last.pt`` after each epoch.
        on_resume: Called with the resumed checkpoint before the first epoch.
    """

    run: RunDir
    mode: str
    epochs: int
    select_metric: str
    signature: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.nn.Module | None
    dist: Distributed
    train_epoch: Callable[[int, Advance], tuple[torch.Tensor, int]]
    validate: Callable[[torch.nn.Module], tuple[dict[str, float], bool]]
    write_best: Callable[[torch.nn.Module, BestRecord], None]
    best_facts: dict[str, Any]
    images_per_epoch: int | None = None
    extra_state: Callable[[], dict[str, Any]] = dict
    on_resume: Callable[[Checkpoint], None] | None = None


@dataclass
class Epochs:
    """What the epochs did: where they started (0: fresh) and the selected epoch."""

    resumed_from: int
    best: Selection
    history: list[dict[str, float]] = field(default_factory=list)


@contextlib.contextmanager
def _epoch_bars(loop: EpochLoop, start: int, progress: bool) -> Iterator[Callable[[int], Any]]:
    """``bar(epoch)`` -> a context giving ``advance`` for that epoch; one bar over epochs, or one per epoch."""
    if loop.images_per_epoch is None:
        with progress_bar(f"train ({loop.mode})", total=loop.epochs, unit="epoch", enabled=progress) as advance:
            advance(start)

            @contextlib.contextmanager
            def one(epoch: int) -> Iterator[Advance]:
                yield _no_progress
                advance(1)

            yield one
    else:

        def per_epoch(epoch: int):
            label = f"train epoch {epoch + 1}/{loop.epochs}"
            return progress_bar(label, total=loop.images_per_epoch, unit="img", enabled=progress)

        yield per_epoch


def run_epochs(
    loop: EpochLoop,
    progress: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> Epochs:
    """Train ``loop`` from its ``last.pt`` (or from scratch) to ``loop.epochs``, writing the per-epoch artifacts.

    Args:
        loop: The loop's parts.
        progress: Show progress bars on stderr.
        on_epoch_end: Called as ``fn(epoch, metrics)`` after each epoch's checkpoints are on disk.
    """
    run, dist = loop.run, loop.dist
    if dist.is_main:
        for stale in run.checkpoints.glob(".*.tmp"):  # temp files of a write that SIGKILL interrupted
            stale.unlink(missing_ok=True)
    start, history, best = 0, [], Selection()
    resumed = resume_checkpoint(run, loop.signature, loop.model, loop.optimizer, loop.scheduler, loop.ema, dist)
    if resumed is not None:
        if loop.on_resume is not None:
            loop.on_resume(resumed)
        start, history, best = resumed.epoch, list(resumed.history), resumed.best
    done = Epochs(resumed_from=start, best=best, history=history)
    with _epoch_bars(loop, start, progress) as bar:
        for epoch in range(start, loop.epochs):
            with bar(epoch) as advance:
                sums, used = loop.train_epoch(epoch, advance)
            evaluated = loop.ema.module if loop.ema is not None else loop.model
            metrics, has_val = loop.validate(evaluated)
            lr = float(loop.optimizer.param_groups[0]["lr"])
            history.append(epoch_row(epoch, (sums / max(used, 1)).tolist(), metrics, lr))
            selected = best.after(epoch, metrics, loop.select_metric, has_val)
            if selected is not None:
                best = selected
                loop.write_best(evaluated, best.record(loop.select_metric, loop.ema is not None, **loop.best_facts))
            write_metrics_csv(run.metrics, history)
            checkpoint = Checkpoint(loop.signature, epoch + 1, history, best, loop.extra_state())
            save_checkpoint(run, checkpoint, loop.model, loop.optimizer, loop.scheduler, loop.ema)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, metrics)
    done.best = best
    return done


def write_split_scores(
    run: RunDir,
    dist: Distributed,
    score: Callable[[str], tuple[list[str], torch.Tensor, HeadOutput]],
    inputs: list[Path],
) -> dict[str, Path]:
    """``scores/<split>.csv`` of every scored split from ``score(split) -> (ids, labels, output)``; then provenance.

    Args:
        run: The run directory.
        dist: The torchrun job (every rank scores; rank 0 writes).
        score: The selected model's scores of one split.
        inputs: The files training read, recorded in ``provenance.json`` (a later stage refuses when they change).
    """
    run.scores.mkdir(parents=True, exist_ok=True)
    scores = {}
    for split in SCORE_SPLITS:
        ids, labels, output = score(split)
        scores[split] = run.score_file(split)
        write_scores(scores[split], ids, labels, output)
    if dist.is_main:
        provenance.record(run, "train", inputs)
    return scores
