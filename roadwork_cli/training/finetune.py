"""``train --mode train``: fine-tune the backbone through adapters on live (decoded, augmented) images.

decoded images -> backbone with trainable adapters (``model.peft``; ``none`` = frozen backbone, head only on live
features) -> the same three-output head and losses as ``train_cached``. The skeleton is the trainer's: EMA, warm-up +
cosine per optimiser step, selection on val_select, ``metrics.csv``, ``checkpoints/best.*`` + ``last.pt`` and
``scores/<split>.csv`` (the helpers are imported from :mod:`roadwork_cli.training.trainer`).

What is particular to live images:

* Every epoch decodes the training images through :mod:`roadwork_cli.data.decode` (DataLoader workers =
  ``features.workers``) with one ``data.augment`` draw per image seeded by ``(image id, epoch)``, in a permutation
  seeded by ``(train.seed, epoch)``: an epoch is the same whatever the workers, so a resumed run repeats exactly.
* Under torchrun (:mod:`roadwork_cli.runtime.distributed`) each rank decodes and runs its part of every global
  batch through the DDP-wrapped model; the head outputs and labels of all ranks are gathered, so every rank computes
  the single-process loss of the whole batch and DDP's gradient average is its gradient. One process and N processes
  take the same steps (up to float summation order); rank 0 writes the artifacts, and scoring is shared the same way.
* ``train.accumulate`` batches are summed into one optimiser step; ``train.grad_clip`` clips their global norm;
  SAM / F-SAM (``train.optimizer``) re-run the same batches at the perturbed point; ``runtime.precision`` picks the
  autocast dtype (fp16 adds a gradient scaler on CUDA); the backbone runs channels-last (``features.channels_last``).
* The best epoch's adapters are merged into plain backbone weights (:func:`~roadwork_cli.model.peft.merge_adapters`)
  and written to ``checkpoints/best_backbone.safetensors``; ``best.json`` names that file as the backbone's weights,
  with the merged weights' fingerprint, the adapter settings and the decode recipe. ``calibrate``, ``export`` and
  ``predict`` therefore rebuild the fine-tuned model as a plain backbone, and the score files are computed from that
  rebuilt model exactly as ``predict`` computes scores.
* When the run directory holds a finished ``train_cached`` head on the same backbone (its ``best.json``
  fingerprint), the head starts from it (``train.warm_start``); a copy in ``checkpoints/warm_start.*`` keeps a
  resumed run starting from the same head after ``best.*`` has been overwritten.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from roadwork_cli.config import Settings, resolve_batch_size
from roadwork_cli.data.decode import DecodeRecipe, ImageDataset, create_loader, recipe_record, to_model_input
from roadwork_cli.errors import UsageError
from roadwork_cli.features.cache import SplitTable, read_split_table
from roadwork_cli.io import provenance
from roadwork_cli.io.atomic import atomic_path, atomic_write_json, read_json
from roadwork_cli.io.run import RunDir
from roadwork_cli.model.backbones import Backbone, create_backbone
from roadwork_cli.model.head import HeadOutput, SelectiveHead, create_head
from roadwork_cli.model.peft import apply_adapters, merge_adapters, resolve_target_modules
from roadwork_cli.runtime.device import autocast, compute_dtype, precision_tag, resolve_device
from roadwork_cli.runtime.distributed import Distributed, distributed_from_env, main_process_only
from roadwork_cli.training.losses import LOSS_PARTS, selective_loss
from roadwork_cli.training.optim import create_ema, create_scheduler
from roadwork_cli.training.param_groups import create_finetune_optimizer
from roadwork_cli.training.trainer import (
    SCORE_SPLITS,
    TrainSummary,
    _write_best,
    _write_metrics_csv,
    _write_scores,
    best_info,
    epoch_row,
    evaluate_head,
    load_best_head,
    resume_last,
    save_last,
    select_epoch,
    val_select_notes,
)

__all__ = ["BEST_BACKBONE", "LiveModel", "train_live"]

BEST_BACKBONE = "best_backbone.safetensors"
"""Merged (adapters folded in) backbone weights of the selected epoch, inside ``checkpoints/``."""
_WARM_START = "warm_start"


class LiveModel(nn.Module):
    """Backbone (possibly with adapters) + selective head: ``(B, 3, H, W)`` normalised images -> HeadOutput.

    A backbone without trainable parameters (``model.peft.method: none``) runs without a graph: nothing to keep.

    With adapters, a training forward keeps what backward needs of every layer of every image: about 80-120 MB per
    224-pixel image for efficientnet_lite0, and the optimiser batch (``train.batch_size``, 256 by default) is the whole
    training set of a small run. So the backbone runs in checkpointed chunks of ``chunk`` images: only each chunk's
    input is kept, and backward recomputes one chunk's activations at a time (with the same dropout draws). The
    gradient is the whole batch's, as the selective loss (a batch statistic) needs; memory no longer grows with the
    batch, at the price of a second backbone forward per chunk.
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


@dataclass
class _Images:
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
class _Setup:
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


# ------------------------------------------------------------------------------------------------------- building


def _create_backbone(settings: Settings) -> Backbone:
    model = settings.model
    return create_backbone(model.backbone, weights=model.weights, image_size=model.image_size)


def _setup(
    settings: Settings, device: torch.device, n_train: int, warm_head: Path | None, backbone: Backbone | None = None
) -> _Setup:
    """Adapted backbone (``backbone`` or a new one), head (from ``warm_head`` if given), optimiser and the rest."""
    ts = settings.train
    dtype = compute_dtype(device, settings.runtime.precision)
    if dtype == torch.float16 and ts.optimizer != "adamw":
        raise UsageError(
            f"train.optimizer {ts.optimizer} with runtime.precision fp16 is not supported: the gradient scaler cannot "
            "unscale the two gradients of a sharpness-aware step. Use runtime.precision bf16 (or fp32)."
        )
    backbone = backbone if backbone is not None else _create_backbone(settings)
    base_fingerprint = backbone.fingerprint
    peft_settings = settings.model.peft
    adapting = peft_settings.method != "none"
    targets = resolve_target_modules(backbone, peft_settings.target_modules) if adapting else []
    torch.manual_seed(ts.seed)  # adapter initialisation (LoRA's A) and the head's
    apply_adapters(backbone, peft_settings)
    head = create_head(settings.model, backbone.feature_dim)
    if warm_head is not None:
        # A train.cls_fit=logistic_cv head's cls_linear fits the frozen features only; the trunk's cls output trains on.
        head.load_state_dict({k: v for k, v in load_file(str(warm_head)).items() if not k.startswith("cls_linear.")})
    # The images whose activations a training forward holds at once: the forward batch of scoring and the cache.
    chunk = resolve_batch_size(settings.features.batch_size, device.type, gpu=64)
    model = LiveModel(backbone, head, chunk).to(device)
    if settings.features.channels_last:
        model.backbone = model.backbone.to(memory_format=torch.channels_last)
    accumulate = ts.accumulate
    # As in train_cached: small training sets get smaller batches so an epoch has min_steps_per_epoch steps.
    batch_size = max(1, min(ts.batch_size, math.ceil(n_train / (ts.min_steps_per_epoch * accumulate))))
    steps_per_epoch = math.ceil(math.ceil(n_train / batch_size) / accumulate)
    optimizer = create_finetune_optimizer(head, backbone if adapting else None, ts)
    scheduler = create_scheduler(optimizer, ts, steps_per_epoch)
    ema = create_ema(model, ts.ema_decay)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    from roadwork_cli.data.transforms import augmentation_from_settings

    recipe = DecodeRecipe(
        backbone.preprocessing,
        jpeg_draft=settings.data.jpeg_draft is not False,
        max_pixels=settings.data.max_image_pixels,
        max_file_bytes=settings.data.max_file_bytes,
    )
    augmentation = augmentation_from_settings(settings.data, backbone.preprocessing, output="uint8")
    return _Setup(
        settings, device, dtype, recipe, augmentation, model, optimizer, scheduler, ema, scaler, batch_size,
        steps_per_epoch, adapting, base_fingerprint, targets, distributed_from_env(settings.runtime.device),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ warm start


def _warm_start(run: RunDir, settings: Settings, base_fingerprint: str, feature_dim: int) -> Path | None:
    """The head to start from: a finished train_cached head on this backbone, kept in ``warm_start.*``.

    Reduced-precision caches carry a ``-bf16`` / ``-fp16`` / ``-fulldecode`` suffix on the backbone fingerprint; the
    head fits those features all the same.
    """
    if not settings.train.warm_start:
        return None
    kept = run.checkpoints / f"{_WARM_START}.safetensors"
    best_json = run.checkpoints / "best.json"
    if best_json.exists() and (run.checkpoints / "best.safetensors").exists():
        info = read_json(best_json)
        fingerprint = str(info.get("fingerprint", "")).split("-")[0]
        head = info.get("head") or {}
        same_head = (
            head.get("in_dim"),
            head.get("hidden"),
            bool(head.get("standardize", False)),
            head.get("gate", "shared"),
        ) == (feature_dim, settings.model.head_hidden, settings.model.head_standardize, settings.model.head_gate)
        if info.get("mode", "train_cached") != "train" and fingerprint == base_fingerprint and same_head:
            data = (run.checkpoints / "best.safetensors").read_bytes()
            if not kept.exists() or kept.read_bytes() != data:
                run.checkpoints.mkdir(parents=True, exist_ok=True)
                with atomic_path(kept) as tmp:
                    tmp.write_bytes(data)
                atomic_write_json(run.checkpoints / f"{_WARM_START}.json", {"fingerprint": base_fingerprint})
    record = run.checkpoints / f"{_WARM_START}.json"
    if kept.exists() and record.exists() and read_json(record).get("fingerprint") == base_fingerprint:
        return kept
    return None


# ------------------------------------------------------------------------------------------------------ one epoch


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches of training positions: a permutation seeded by ``(seed, epoch)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def _loader(setup: _Setup, paths: list[str], seeds: list[int | None] | None, batches: list[list[int]]):
    dataset = ImageDataset(paths, setup.recipe, seeds=seeds, augment=setup.augmentation)
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


def _padded_input(setup: _Setup, part: _Part) -> torch.Tensor:
    """``(part.rows, 3, S, S)`` model input: this rank's images, then zero rows."""
    size = setup.model.backbone.preprocessing.size
    pixels = part.pixels if part.pixels is not None else torch.zeros((0, size, size, 3), dtype=torch.uint8)
    if pixels.shape[0] < part.rows:
        pixels = torch.cat([pixels, pixels.new_zeros((part.rows - pixels.shape[0], *pixels.shape[1:]))])
    return to_model_input(pixels, setup.model.backbone.preprocessing, setup.device, setup.channels_last)


def _backward(setup: _Setup, group: list[_Part]) -> torch.Tensor:
    """Forward + backward of one accumulation group (gradients summed, each batch weighted by its share of images).

    Each batch's loss is computed from the gathered outputs of every rank, i.e. it is the single-process loss of the
    whole batch (batch statistics such as the mean gate included); DDP averages the gradients once per group.

    Returns:
        The per-part loss sums ``(len(LOSS_PARTS),)`` over the group's images.
    """
    ts, dist = setup.settings.train, setup.dist
    model = dist.wrap(setup.model)
    total = sum(part.total for part in group)
    sums = torch.zeros(len(LOSS_PARTS))
    for k, part in enumerate(group):
        own = part.counts[dist.rank]
        last = k == len(group) - 1
        with model.no_sync() if dist.enabled and not last else contextlib.nullcontext():
            with autocast(setup.device, setup.dtype):
                output = model(_padded_input(setup, part))  # 3 x (rows,)
            output = dist.gather(HeadOutput(*(t.float()[:own] for t in output)), part.counts)  # 3 x (total,)
            labels = dist.gather(part.labels.to(setup.device), part.counts)  # (total,)
            loss, parts = selective_loss(output, labels, ts.loss, ts.target_coverage)
            loss = loss * (part.total / total)
            (setup.scaler.scale(loss) if setup.scaler is not None else loss).backward()
        sums += torch.stack([parts[p].detach().float().cpu() for p in LOSS_PARTS]) * part.total
    return sums


def _clip(setup: _Setup) -> None:
    clip = setup.settings.train.grad_clip
    if clip is not None:
        if setup.scaler is not None:
            setup.scaler.unscale_(setup.optimizer)
        torch.nn.utils.clip_grad_norm_(setup.trainable, clip)


def _step(setup: _Setup, group: list[_Part], step: int) -> torch.Tensor:
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


def _train_epoch(setup: _Setup, images: _Images, epoch: int, advance: Callable[..., None]) -> tuple[torch.Tensor, int]:
    """One pass over the training images (fresh augmentation); returns the loss-part sums and the images used."""
    ts, dist = setup.settings.train, setup.dist
    train_ids = images.ids("train")
    setup.model.train()
    view = 1  # epoch 0 draws what the feature cache's view 1 holds; later epochs other draws
    from roadwork_cli.data.transforms import augment_seed

    seeds: list[int | None] = [augment_seed(i, view, epoch) for i in train_ids]
    batches = _batches(len(train_ids), setup.batch_size, ts.seed, epoch)
    labels_all = images.labels(train_ids)
    sums, used, group = torch.zeros(len(LOSS_PARTS)), 0, []
    step = epoch * setup.steps_per_epoch
    parts = [batch[dist.part(len(batch))] for batch in batches]  # what this rank decodes (all, in one process)
    loader = _loader(setup, images.paths(train_ids), seeds, parts)
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
            advance(0, description=f"train epoch {epoch + 1}/{ts.epochs} loss {float(sums[0]) / max(used, 1):.4f}")
        advance(len(batch))
    images.share_failures(dist)
    return sums, used


# ------------------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def _score(
    setup: _Setup, model: LiveModel, images: _Images, ids: list[str]
) -> tuple[list[str], torch.Tensor, HeadOutput]:
    """Clean-view scores of ``ids`` as ``predict`` computes them (backbone under autocast, head in fp32).

    Under torchrun each rank scores its contiguous part of ``ids`` and every rank gets all the scores, in order.

    Returns:
        The ids that could be read, their labels ``(N,)`` and the head's output (each ``(N,)``, on CPU).
    """
    dist = setup.dist
    model.eval()
    own = range(len(ids))[dist.part(len(ids))]
    batch = resolve_batch_size(setup.settings.features.batch_size, setup.device.type, gpu=64)
    batches = [list(range(s, min(s + batch, own.stop))) for s in range(own.start, own.stop, batch)]
    kept: list[str] = []
    outputs: list[HeadOutput] = []
    for indices, pixels, failed in _loader(setup, images.paths(ids), None, batches):
        for index, reason in failed:
            images.failed.setdefault(ids[index], reason)
        if pixels is None:
            continue
        x = to_model_input(pixels, model.backbone.preprocessing, setup.device, setup.channels_last)
        with autocast(setup.device, setup.dtype):
            features = model.backbone(x).float()  # (B, D)
        outputs.append(HeadOutput(*(t.float() for t in model.head(features))))  # 3 x (B,)
        kept += [ids[i] for i in indices]
    if outputs:
        output = HeadOutput(*(torch.cat(parts) for parts in zip(*outputs, strict=True)))  # 3 x (n_r,)
    else:  # nothing of this rank's part decoded (or it has none): it still joins the gather
        output = HeadOutput(*(torch.zeros(0, device=setup.device) for _ in HeadOutput._fields))
    output = dist.gather(output)  # 3 x (N,) of every rank, in rank order
    kept = [i for part in dist.all_gather_json(kept) for i in part]
    images.share_failures(dist)
    return kept, images.labels(kept), HeadOutput(*(t.cpu() for t in output))


# --------------------------------------------------------------------------------------------------- checkpoints


def _adapter_record(setup: _Setup) -> dict[str, Any]:
    peft_settings = setup.settings.model.peft
    return {
        **peft_settings.model_dump(mode="json"),
        "target_modules": setup.targets,
        "base_fingerprint": setup.base_fingerprint,
    }


def _merged_backbone(model: LiveModel) -> Backbone:
    """A CPU copy of ``model``'s backbone with the adapters folded into plain weights."""
    backbone = copy.deepcopy(model.backbone).cpu().to(memory_format=torch.contiguous_format)
    return merge_adapters(backbone)


@main_process_only
def _write_live_best(run: RunDir, setup: _Setup, model: LiveModel, info: dict[str, Any]) -> None:
    """best_backbone.safetensors (merged; adapted runs only), then best.safetensors + best.json (trainer's writer)."""
    if setup.adapting:
        merged = _merged_backbone(model)
        state = {k: v.detach().contiguous().clone() for k, v in merged.model.state_dict().items()}
        with atomic_path(run.checkpoints / BEST_BACKBONE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        merged.weights = f"{run.checkpoints.name}/{BEST_BACKBONE}"  # relative to the run: the run may move
        info = dict(info, backbone={"spec": merged.spec, "fingerprint": merged.fingerprint})
        info["fingerprint"] = merged.fingerprint
        info["adapters"] = dict(_adapter_record(setup), merged_fingerprint=merged.fingerprint)
    _write_best(run, model.head, info)


def _best_model(run: RunDir, setup: _Setup) -> tuple[LiveModel, dict[str, Any]]:
    """The selected model rebuilt from disk the way ``Stage1Model.from_run`` rebuilds it, and its ``best.json``."""
    head, info = load_best_head(run)
    if setup.adapting:
        spec = info["backbone"]["spec"]
        backbone = create_backbone(spec["name"], weights=run.root / spec["weights"], image_size=spec.get("image_size"))
    else:
        backbone = _create_backbone(setup.settings)
    model = LiveModel(backbone, head).to(setup.device)
    if setup.channels_last:
        model.backbone = model.backbone.to(memory_format=torch.channels_last)
    return model.eval(), info


def _signature(settings: Settings, setup: _Setup, table: SplitTable, warm: Path | None) -> str:
    """Identifies the training problem; ``last.pt`` is resumed only when it matches."""
    splits = {split: [[i, table.labels[i]] for i in table.ids(split)] for split in ("train", "val_select")}
    payload = {
        "mode": "train",
        "fingerprint": setup.base_fingerprint,
        "train": settings.train.model_dump(mode="json"),
        "model": settings.model.model_dump(mode="json", exclude={"weights", "backbone", "compile"}),
        "augmentation": setup.augmentation.fingerprint,
        "recipe": recipe_record(setup.recipe, precision_tag(setup.dtype)),
        "splits": hashlib.sha256(json.dumps(splits).encode()).hexdigest(),
        "warm_start": hashlib.sha256(warm.read_bytes()).hexdigest() if warm is not None else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------- train


def train_live(
    run: RunDir,
    settings: Settings,
    progress: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Fine-tune backbone adapters + head on decoded images and write the artifacts ``train_cached`` writes.

    Args:
        run: Run directory with ``splits.json`` (no feature cache needed).
        settings: Resolved settings (``train``, ``model`` incl. ``model.peft``, ``data.augment``, ``runtime``,
            ``features.workers`` / ``batch_size`` / ``channels_last`` for decoding and scoring).
        progress: Show a progress bar per epoch (images/s and the running loss) on stderr.
        on_epoch_end: Called as ``fn(epoch, metrics)`` after each epoch's checkpoints are on disk.

    Raises:
        UsageError: No splits or no training images, unknown adapter targets, fp16 with SAM / F-SAM.
    """
    from roadwork_cli.io.progress import progress_bar

    started = time.perf_counter()
    device = resolve_device(settings.runtime.device)
    previous_threads = torch.get_num_threads()
    if settings.runtime.threads:
        torch.set_num_threads(settings.runtime.threads)
    try:
        ts = settings.train
        table = read_split_table(run)
        images = _Images(table, {})
        n_train = len(images.ids("train"))
        if n_train == 0:
            raise UsageError(f"splits.json of {run.root} has no training images; re-run `roadwork split`.")
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        dist = distributed_from_env(settings.runtime.device)
        backbone = _create_backbone(settings)
        with dist.main_first():  # rank 0 tidies up and keeps the warm-start head; the others then find its copy
            if dist.is_main:
                for stale in run.checkpoints.glob(".*.tmp"):  # temp files of a write that SIGKILL interrupted
                    stale.unlink(missing_ok=True)
            warm = _warm_start(run, settings, backbone.fingerprint, backbone.feature_dim)
        setup = _setup(settings, device, n_train, warm, backbone)
        model, optimizer, scheduler, ema = setup.model, setup.optimizer, setup.scheduler, setup.ema
        signature = _signature(settings, setup, table, warm)
        recipe = recipe_record(setup.recipe, precision_tag(setup.dtype))
        base_info = {
            "head": model.head.config,
            "backbone": {"spec": model.backbone.spec, "fingerprint": setup.base_fingerprint},
            "fingerprint": setup.base_fingerprint,
            "mode": "train",
            "recipe": recipe,
            "warm_start": warm is not None,
        }

        last_path = run.checkpoints / "last.pt"
        start_epoch, history = 0, []
        best: dict[str, Any] = {"epoch": -1, "key": [-math.inf, -math.inf], "metrics": {}}
        state = resume_last(last_path, signature, model, optimizer, scheduler, ema, dist)
        if state is not None:
            if setup.scaler is not None and state.get("scaler"):
                setup.scaler.load_state_dict(state["scaler"])
            images.failed.update(state.get("failed", {}))
            start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
        resumed_from = start_epoch
        val_ids = images.ids("val_select")

        for epoch in range(start_epoch, ts.epochs):
            label = f"train epoch {epoch + 1}/{ts.epochs}"
            with progress_bar(label, total=n_train, unit="img", enabled=progress) as advance:
                sums, used = _train_epoch(setup, images, epoch, advance)
            evaluated = ema.module if ema is not None else model
            kept, labels, output = _score(setup, evaluated, images, val_ids)
            metrics = evaluate_head(output, labels)
            row = epoch_row(epoch, (sums / max(used, 1)).tolist(), metrics, float(optimizer.param_groups[0]["lr"]))
            history.append(row)
            selected = select_epoch(best, metrics, ts.select_metric, epoch, has_val=bool(kept))
            if selected is not None:
                best = selected
                _write_live_best(run, setup, evaluated, best_info(base_info, best, ts.select_metric, ema is not None))
            _write_metrics_csv(run.metrics, history)
            scaler = setup.scaler.state_dict() if setup.scaler is not None else {}
            save_last(
                last_path, signature, epoch, model, optimizer, scheduler, ema, history, best,
                scaler=scaler, failed=dict(images.failed),
            )  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, metrics)

        dist.barrier()  # rank 0's best.* is on disk
        best_model, written = _best_model(run, setup)
        scores = {}
        run.scores.mkdir(parents=True, exist_ok=True)
        for split in SCORE_SPLITS:
            kept, labels, output = _score(setup, best_model, images, images.ids(split))
            scores[split] = run.scores / f"{split}.csv"
            _write_scores(scores[split], kept, labels, output)
        if dist.is_main:
            provenance.record(run, "train", [run.splits])
        notes = val_select_notes(images.labels(val_ids))
        if images.failed:
            sample = "; ".join(f"{i[:12]}: {reason}" for i, reason in list(images.failed.items())[:3])
            notes.append(
                f"{len(images.failed)} split image(s) could not be read and are left out of training and of the "
                f"score files (e.g. {sample})."
            )
        return TrainSummary.of_run(
            "train",
            ts,
            resumed_from,
            best,
            started,
            fingerprint=str(written.get("fingerprint", setup.base_fingerprint)),
            backbone=str(settings.model.backbone),
            n_train=n_train,
            n_val_select=len(val_ids),
            scores=scores,
            n_failed=len(images.failed),
            notes=notes,
        )
    finally:
        torch.set_num_threads(previous_threads)
