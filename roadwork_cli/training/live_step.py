"""One pass of the live loop (``train --mode train``) over the training images, one optimiser step at a time.

Under torchrun each rank decodes and runs its part of every global batch through the DDP-wrapped model; the head
outputs and labels of all ranks are gathered, so every rank computes the single-process loss of the whole batch and
DDP's gradient average is its gradient. ``train.accumulate`` batches are summed into one optimiser step;
``train.grad_clip`` clips their global norm; SAM / F-SAM (``train.optimizer``) re-run the same batches at the
perturbed point; fp16 adds a gradient scaler on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from roadwork_cli.config import Settings
from roadwork_cli.data.decode import DecodeRecipe, ImageDataset, create_loader, to_model_input
from roadwork_cli.features.cache import SplitTable
from roadwork_cli.model.backbones import Backbone
from roadwork_cli.model.head import HeadOutput, SelectiveHead
from roadwork_cli.runtime.device import autocast
from roadwork_cli.runtime.distributed import Distributed
from roadwork_cli.training.losses import LOSS_PARTS, selective_loss

__all__ = [
    "LOSS_LOG_STEPS",
    "LiveImages",
    "LiveModel",
    "LiveSetup",
    "compile_training_forward",
    "eager",
    "live_loader",
    "scoring_recipe",
    "train_live_epoch",
]


class LiveModel(nn.Module):
    """Backbone (possibly with adapters) + selective head: ``(B, 3, H, W)`` normalised images -> HeadOutput.

    A backbone without trainable parameters (``model.peft.method: none``) runs without a graph: nothing to keep.

    With adapters, a training forward keeps what backward needs of every layer of every image (per 224-pixel image
    for efficientnet_lite0: 93 MB with LoRA, 123 MB with DoRA), and the optimiser batch (``train.batch_size``, 256 by
    default) is the whole training set of a small run. So the backbone runs in checkpointed chunks of ``chunk``
    images: only each chunk's input is kept, and backward recomputes one chunk's activations at a time (with the same
    dropout draws). The gradient is the whole batch's, as the selective loss (a batch statistic) needs; memory no
    longer grows with the batch, at the price of a second backbone forward per chunk.
    """

    def __init__(self, backbone: Backbone, head: SelectiveHead, chunk: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.adapting = any(p.requires_grad for p in backbone.parameters())  # adapters are in place by now
        self.chunk = chunk

    def forward(self, images: torch.Tensor) -> HeadOutput:
        if not self.adapting:
            with torch.no_grad():
                features = self.backbone(images).float()  # (B, D)
        elif torch.is_grad_enabled() and self.chunk is not None and images.shape[0] > self.chunk:
            from torch.utils.checkpoint import checkpoint

            parts = [checkpoint(self.backbone, part, use_reentrant=False) for part in images.split(self.chunk)]
            features = torch.cat(parts).float()  # (B, D)
        else:
            features = self.backbone(images).float()  # (B, D)
        return self.head(features)  # 3 x (B,)


def compile_training_forward(backbone: nn.Module) -> None:
    """``model.compile_backbone``: route ``backbone``'s calls through ``torch.compile`` in place.

    ``nn.Module.compile`` keeps the parameters and state-dict keys, so checkpoints, EMA and the merged backbone are
    those of the eager module (see :func:`eager`). The graph is captured at the first training step: a failure to
    compile surfaces there, as torch's error.
    """
    backbone.compile(dynamic=False)


def eager(module: nn.Module) -> nn.Module:
    """``module`` itself, or a shallow copy without the compiled call of :func:`compile_training_forward`."""
    if getattr(module, "_compiled_call_impl", None) is None:
        return module
    plain = copy.copy(module)  # shares parameters and children; only the instance's call route differs
    plain.__dict__ = dict(module.__dict__, _compiled_call_impl=None)
    return plain


@dataclass
class LiveImages:
    """Ordered ids, locators and labels per split; ``failed`` collects unreadable images with their reason."""

    table: SplitTable
    failed: dict[str, str]

    def ids(self, split: str) -> list[str]:
        return self.table.ids(split)

    def paths(self, ids: Sequence[str]) -> list[str]:
        return [self.table.paths[i] for i in ids]

    def labels(self, ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.table.labels[i] for i in ids], dtype=torch.float32)  # (N,)

    def share_failures(self, dist: Distributed) -> None:
        """Every rank's unreadable images (each rank only decodes its part) in ``failed`` on every rank."""
        for failed in dist.all_gather_json(self.failed):
            for image_id, reason in failed.items():
                self.failed.setdefault(image_id, reason)


@dataclass
class LiveSetup:
    """Everything one run of the loop needs, built the same way for a fresh start and a resume."""

    settings: Settings
    device: torch.device
    dtype: torch.dtype | None
    recipe: DecodeRecipe
    augmentation: Any
    model: LiveModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: nn.Module | None
    scaler: torch.amp.GradScaler | None
    batch_size: int
    steps_per_epoch: int
    adapting: bool
    base_fingerprint: str
    targets: list[str]
    dist: Distributed

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def channels_last(self) -> bool:
        return bool(self.settings.features.channels_last)


def scoring_recipe(setup: LiveSetup) -> DecodeRecipe:
    """The recipe of clean scoring (val_select each epoch, the score files): ``data.decoder``'s, which best.json
    records so that predict decodes the same way. Augmented training draws are PIL images, so they stay on PIL."""
    return replace(setup.recipe, decoder=setup.settings.data.decoder)


# ------------------------------------------------------------------------------------------------------ one epoch


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches of training positions: a permutation seeded by ``(seed, epoch)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def live_loader(setup: LiveSetup, paths: list[str], seeds: list[int | None] | None, batches: list[list[int]]):
    """Training batches (``seeds``: augmented draws) decode in DataLoader workers with PIL; clean scoring batches
    (``seeds`` None) follow ``data.decoder`` (:func:`scoring_recipe`)."""
    recipe = setup.recipe if seeds is not None else scoring_recipe(setup)
    dataset = ImageDataset(paths, recipe, seeds=seeds, augment=setup.augmentation)
    workers = setup.settings.features.workers
    return create_loader(dataset, batch_sampler=batches, workers=workers, pin_memory=setup.device.type == "cuda")


@dataclass
class _Part:
    """This rank's part of one global batch, as the loss of the whole batch needs it.

    Attributes:
        pixels: ``(b_r, S, S, 3)`` uint8 of this rank's images that decoded, or None when none did.
        labels: ``(b_r,)`` their labels.
        counts: Every rank's ``b_r``, in rank order (one collective per batch).
        rows: Rows every rank runs through the model: ``ceil(batch / world size)``, zero-padded, so that every rank
            draws the same randomness (adapter dropout) and rank 0's saved RNG state resumes them all.
    """

    pixels: torch.Tensor | None
    labels: torch.Tensor
    counts: list[int]
    rows: int

    @property
    def total(self) -> int:
        """Images of the whole global batch that decoded, over all ranks."""
        return sum(self.counts)


def _padded_input(setup: LiveSetup, part: _Part) -> torch.Tensor:
    """``(part.rows, 3, S, S)`` model input: this rank's images, then zero rows."""
    size = setup.model.backbone.preprocessing.size
    pixels = part.pixels if part.pixels is not None else torch.zeros((0, size, size, 3), dtype=torch.uint8)
    if pixels.shape[0] < part.rows:
        pixels = torch.cat([pixels, pixels.new_zeros((part.rows - pixels.shape[0], *pixels.shape[1:]))])
    return to_model_input(pixels, setup.model.backbone.preprocessing, setup.device, setup.channels_last)


def _backward(setup: LiveSetup, group: list[_Part]) -> torch.Tensor:
    """Forward + backward of one accumulation group (gradients summed, each batch weighted by its share of images).

    Each batch's loss is computed from the gathered outputs of every rank, i.e. it is the single-process loss of the
    whole batch (batch statistics such as the mean gate included); DDP averages the gradients once per group.

    Returns:
        The per-part loss sums ``(len(LOSS_PARTS),)`` over the group's images, on ``setup.device``: reading them on
        the host would wait for the GPU to finish the step, so they are read once per epoch (and per log interval).
    """
    ts, dist = setup.settings.train, setup.dist
    model = dist.wrap(setup.model)
    total = sum(part.total for part in group)
    sums = torch.zeros(len(LOSS_PARTS), device=setup.device)
    for k, part in enumerate(group):
        own = part.counts[dist.rank]
        last = k == len(group) - 1
        with model.no_sync() if dist.enabled and not last else contextlib.nullcontext():
            with autocast(setup.device, setup.dtype):
                output = model(_padded_input(setup, part))  # 3 x (rows,)
            output = dist.gather(HeadOutput(*(t.float()[:own] for t in output)), part.counts)  # 3 x (total,)
            labels = dist.gather(part.labels.to(setup.device, non_blocking=True), part.counts)  # (total,)
            loss, parts = selective_loss(output, labels, ts.loss, ts.target_coverage)
            loss = loss * (part.total / total)
            (setup.scaler.scale(loss) if setup.scaler is not None else loss).backward()
        sums += torch.stack([parts[p].detach().float() for p in LOSS_PARTS]) * part.total
    return sums


def _clip(setup: LiveSetup) -> None:
    clip = setup.settings.train.grad_clip
    if clip is not None:
        if setup.scaler is not None:
            setup.scaler.unscale_(setup.optimizer)
        torch.nn.utils.clip_grad_norm_(setup.trainable, clip)


def _step(setup: LiveSetup, group: list[_Part], step: int) -> torch.Tensor:
    """One optimiser step over an accumulation group; returns the loss-part sums at the unperturbed weights."""
    setup.optimizer.zero_grad(set_to_none=True)
    sums = _backward(setup, group)
    _clip(setup)
    if setup.settings.train.optimizer == "adamw":
        if setup.scaler is not None:
            setup.scaler.step(setup.optimizer)
            setup.scaler.update()
        else:
            setup.optimizer.step()
    else:

        def closure() -> torch.Tensor:  # the same batches again, at the perturbed weights
            parts = _backward(setup, group)
            _clip(setup)
            return parts[0]

        setup.optimizer.step(closure)
    setup.scheduler.step()
    if setup.ema is not None:
        setup.ema.update(setup.model, step=step)
    return sums


def train_live_epoch(
    setup: LiveSetup, images: LiveImages, epoch: int, advance: Callable[..., None]
) -> tuple[torch.Tensor, int]:
    """One pass over the training images (fresh augmentation); returns the loss-part sums and the images used."""
    ts, dist = setup.settings.train, setup.dist
    train_ids = images.ids("train")
    setup.model.train()
    view = 1  # epoch 0 draws what the feature cache's view 1 holds; later epochs other draws
    from roadwork_cli.data.transforms import augment_seed

    seeds: list[int | None] = [augment_seed(i, view, epoch) for i in train_ids]
    batches = _batches(len(train_ids), setup.batch_size, ts.seed, epoch)
    labels_all = images.labels(train_ids)
    sums, used, group = torch.zeros(len(LOSS_PARTS), device=setup.device), 0, []
    step = epoch * setup.steps_per_epoch
    parts = [batch[dist.part(len(batch))] for batch in batches]  # what this rank decodes (all, in one process)
    loader = live_loader(setup, images.paths(train_ids), seeds, parts)
    for b, (batch, (indices, pixels, failed)) in enumerate(zip(batches, loader, strict=True)):
        for index, reason in failed:
            images.failed.setdefault(train_ids[index], reason)
        part = _Part(pixels, labels_all[indices], dist.row_counts(len(indices)), -(-len(batch) // dist.world_size))
        if part.total:  # a batch none of whose images decoded on any rank is skipped by every rank
            group.append(part)
        if group and (len(group) == ts.accumulate or b == len(batches) - 1):
            sums += _step(setup, group, step)
            step += 1
            used += sum(part.total for part in group)
            group = []
            if _show_loss(setup.device, step - epoch * setup.steps_per_epoch, b == len(batches) - 1):
                loss = float(sums[0]) / max(used, 1)  # a host sync on a GPU: only every LOSS_LOG_STEPS steps
                advance(0, description=f"train epoch {epoch + 1}/{ts.epochs} loss {loss:.4f}")
        advance(len(batch))
    images.share_failures(dist)
    return sums.cpu(), used  # the epoch's one wait for the device


LOSS_LOG_STEPS = 25
"""On an accelerator the running loss in the progress label is read every this many optimiser steps (and at the
epoch's end): reading it waits for the device to finish every queued step, which keeps the host from preparing the
next batches meanwhile. On the CPU reading it costs nothing and it is shown after every step."""


def _show_loss(device: torch.device, steps_done: int, last: bool) -> bool:
    return device.type == "cpu" or last or steps_done % LOSS_LOG_STEPS == 0
