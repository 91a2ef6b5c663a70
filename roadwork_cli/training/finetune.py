"""``train --mode train``: fine-tune the backbone through adapters on live (decoded, augmented) images.

decoded images -> backbone with trainable adapters (``model.peft``; ``none`` = frozen backbone, head only on live
features) -> the same three-output head and losses as ``train_cached``. The epochs run in the skeleton both loops
share (:mod:`roadwork_cli.training.epochs`): EMA, warm-up + cosine per optimiser step, selection on val_select,
``metrics.csv``, ``checkpoints/best.*`` + ``last.pt`` and ``scores/<split>.csv``.

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

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from roadwork_cli.config import Settings, resolve_batch_size
from roadwork_cli.data.decode import DecodeRecipe, check_decoder, recipe_record, to_model_input
from roadwork_cli.errors import UsageError
from roadwork_cli.features.cache import SplitTable, read_split_table
from roadwork_cli.io.atomic import atomic_path, atomic_write_json, read_json
from roadwork_cli.io.records import BestRecord
from roadwork_cli.io.run import RunDir
from roadwork_cli.model.backbones import Backbone, create_backbone
from roadwork_cli.model.head import HeadOutput, create_head
from roadwork_cli.model.peft import apply_adapters, merge_adapters, resolve_target_modules
from roadwork_cli.runtime.device import autocast, compute_dtype, precision_tag
from roadwork_cli.runtime.distributed import distributed_from_env, main_process_only
from roadwork_cli.training.artifacts import (
    TrainSummary,
    evaluate_head,
    load_best_head,
    training_signature,
    val_select_notes,
    write_best,
)
from roadwork_cli.training.epochs import EpochLoop, run_epochs, write_split_scores
from roadwork_cli.training.live_step import (
    LiveImages,
    LiveModel,
    LiveSetup,
    compile_training_forward,
    eager,
    live_loader,
    scoring_recipe,
    train_live_epoch,
)
from roadwork_cli.training.optim import create_ema, create_scheduler
from roadwork_cli.training.param_groups import create_finetune_optimizer

__all__ = ["train_live"]


# ------------------------------------------------------------------------------------------------------- building


def _create_backbone(settings: Settings) -> Backbone:
    model = settings.model
    return create_backbone(model.backbone, weights=model.weights, image_size=model.image_size)


def _setup(
    settings: Settings, device: torch.device, n_train: int, warm_head: Path | None, backbone: Backbone | None = None
) -> LiveSetup:
    """Adapted backbone (``backbone`` or a new one), head (from ``warm_head`` if given), optimiser and the rest."""
    ts = settings.train
    dtype = compute_dtype(device, settings.runtime.precision)
    check_decoder(settings.data.decoder, device)
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
    ema = create_ema(model, ts.ema_decay)  # an eager copy: validation and the best checkpoint never compile
    if settings.model.compile_backbone and adapting:
        compile_training_forward(model.backbone)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    from roadwork_cli.data.transforms import augmentation_from_settings

    recipe = DecodeRecipe(
        backbone.preprocessing,
        jpeg_draft=settings.data.jpeg_draft is not False,
        max_pixels=settings.data.max_image_pixels,
        max_file_bytes=settings.data.max_file_bytes,
    )
    augmentation = augmentation_from_settings(settings.data, backbone.preprocessing, output="uint8")
    return LiveSetup(
        settings, device, dtype, recipe, augmentation, model, optimizer, scheduler, ema, scaler, batch_size,
        steps_per_epoch, adapting, base_fingerprint, targets, distributed_from_env(settings.runtime.device),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ warm start


def _warm_start(run: RunDir, settings: Settings, base_fingerprint: str, feature_dim: int) -> Path | None:
    """The head to start from: a finished train_cached head on this backbone (not refit on val_select), kept in
    ``warm_start.*``.

    Reduced-precision caches carry a ``-bf16`` / ``-fp16`` / ``-fulldecode`` suffix on the backbone fingerprint; the
    head fits those features all the same.
    """
    if not settings.train.warm_start:
        return None
    kept, kept_record = run.warm_start_weights, run.warm_start_record
    if run.best_record.exists() and run.best_weights.exists():
        best = BestRecord.from_json(read_json(run.best_record))
        fingerprint = best.fingerprint.split("-")[0]
        head = best.head or {}
        same_head = (
            head.get("in_dim"),
            head.get("hidden"),
            bool(head.get("standardize", False)),
            head.get("gate", "shared"),
        ) == (feature_dim, settings.model.head_hidden, settings.model.head_standardize, settings.model.head_gate)
        # A refit head was trained on val_select, whose scores the live loop writes for calibration: not a start.
        # (Without the refit, only cls_linear saw val_select, and it is not loaded.)
        if best.mode != "train" and fingerprint == base_fingerprint and same_head and not best.refit:
            data = run.best_weights.read_bytes()
            if not kept.exists() or kept.read_bytes() != data:
                run.checkpoints.mkdir(parents=True, exist_ok=True)
                with atomic_path(kept) as tmp:
                    tmp.write_bytes(data)
                atomic_write_json(kept_record, {"fingerprint": base_fingerprint})
    if kept.exists() and kept_record.exists() and read_json(kept_record).get("fingerprint") == base_fingerprint:
        return kept
    return None


# ------------------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def _score(
    setup: LiveSetup, model: LiveModel, images: LiveImages, ids: list[str]
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
    for indices, pixels, failed in live_loader(setup, images.paths(ids), None, batches):
        for index, reason in failed:
            images.failed.setdefault(ids[index], reason)
        if pixels is None:
            continue
        x = to_model_input(pixels, model.backbone.preprocessing, setup.device, setup.channels_last)
        with autocast(setup.device, setup.dtype):
            features = eager(model.backbone)(x).float()  # (B, D)
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


def _adapter_record(setup: LiveSetup) -> dict[str, Any]:
    peft_settings = setup.settings.model.peft
    return {
        **peft_settings.model_dump(mode="json"),
        "target_modules": setup.targets,
        "base_fingerprint": setup.base_fingerprint,
    }


def _merged_backbone(model: LiveModel) -> Backbone:
    """A CPU copy of ``model``'s backbone with the adapters folded into plain weights."""
    backbone = copy.deepcopy(eager(model.backbone)).cpu().to(memory_format=torch.contiguous_format)
    return merge_adapters(backbone)


@main_process_only
def _write_live_best(run: RunDir, setup: LiveSetup, model: LiveModel, record: BestRecord) -> None:
    """best_backbone.safetensors (merged; adapted runs only), then best.safetensors + best.json."""
    if setup.adapting:
        merged = _merged_backbone(model)
        state = {k: v.detach().contiguous().clone() for k, v in merged.model.state_dict().items()}
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.best_backbone) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        merged.weights = run.best_backbone.relative_to(run.root).as_posix()  # relative to the run: the run may move
        record = replace(
            record,
            backbone={"spec": merged.spec, "fingerprint": merged.fingerprint},
            fingerprint=merged.fingerprint,
            adapters=dict(_adapter_record(setup), merged_fingerprint=merged.fingerprint),
        )
    write_best(run, model.head, record)


def _best_model(run: RunDir, setup: LiveSetup) -> tuple[LiveModel, BestRecord]:
    """The selected model rebuilt from disk the way ``Stage1Model.from_run`` rebuilds it, and its record."""
    head, record = load_best_head(run)
    if setup.adapting:
        spec = record.backbone["spec"]
        backbone = create_backbone(spec["name"], weights=run.root / spec["weights"], image_size=spec.get("image_size"))
    else:
        backbone = _create_backbone(setup.settings)
    model = LiveModel(backbone, head).to(setup.device)
    if setup.channels_last:
        model.backbone = model.backbone.to(memory_format=torch.channels_last)
    return model.eval(), record


def _signature(settings: Settings, setup: LiveSetup, table: SplitTable, warm: Path | None) -> str:
    """The training problem: base backbone, settings, augmentation, decode recipe, splits, warm-start head."""
    splits = {split: [[i, table.labels[i]] for i in table.ids(split)] for split in ("train", "val_select")}
    return training_signature(
        settings.train,
        setup.base_fingerprint,
        splits,
        mode="train",
        model=settings.model.model_dump(mode="json", exclude={"weights", "backbone", "compile", "compile_backbone"}),
        augmentation=setup.augmentation.fingerprint,
        recipe=recipe_record(scoring_recipe(setup), precision_tag(setup.dtype)),
        warm_start=hashlib.sha256(warm.read_bytes()).hexdigest() if warm is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------- train


def train_live(
    run: RunDir,
    settings: Settings,
    device: torch.device,
    progress: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Fine-tune backbone adapters + head on decoded images and write the artifacts ``train_cached`` writes.

    Args:
        run: Run directory with ``splits.json`` (no feature cache needed).
        settings: Resolved settings (``train``, ``model`` incl. ``model.peft``, ``data.augment``, ``runtime``,
            ``features.workers`` / ``batch_size`` / ``channels_last`` for decoding and scoring).
        device: Where to train.
        progress: Show a progress bar per epoch (images/s and the running loss) on stderr.
        on_epoch_end: Called as ``fn(epoch, metrics)`` after each epoch's checkpoints are on disk.

    Raises:
        UsageError: No splits or no training images, unknown adapter targets, fp16 with SAM / F-SAM.
    """
    started = time.perf_counter()
    ts = settings.train
    table = read_split_table(run)
    images = LiveImages(table, {})
    n_train = len(images.ids("train"))
    if n_train == 0:
        raise UsageError(f"splits.json of {run.root} has no training images; re-run `roadwork split`.")
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    dist = distributed_from_env(settings.runtime.device)
    backbone = _create_backbone(settings)
    with dist.main_first():  # rank 0 keeps the warm-start head; the others then find its copy
        warm = _warm_start(run, settings, backbone.fingerprint, backbone.feature_dim)
    setup = _setup(settings, device, n_train, warm, backbone)
    model, ema = setup.model, setup.ema
    val_ids = images.ids("val_select")

    def validate(evaluated: torch.nn.Module) -> tuple[dict[str, float], bool]:
        kept, labels, output = _score(setup, evaluated, images, val_ids)
        return evaluate_head(output, labels), bool(kept)

    def on_resume(checkpoint: Any) -> None:
        if setup.scaler is not None and checkpoint.extra.get("scaler"):
            setup.scaler.load_state_dict(checkpoint.extra["scaler"])
        images.failed.update(checkpoint.extra.get("failed", {}))

    def extra_state() -> dict[str, Any]:
        scaler = setup.scaler.state_dict() if setup.scaler is not None else {}
        return {"scaler": scaler, "failed": dict(images.failed)}

    facts = {
        "head": model.head.config,
        "backbone": {"spec": model.backbone.spec, "fingerprint": setup.base_fingerprint},
        "fingerprint": setup.base_fingerprint,
        "mode": "train",
        "recipe": recipe_record(scoring_recipe(setup), precision_tag(setup.dtype)),
        "warm_start": warm is not None,
    }
    loop = EpochLoop(
        run, "train", ts.epochs, ts.select_metric, _signature(settings, setup, table, warm), model, setup.optimizer,
        setup.scheduler, ema, dist, lambda epoch, advance: train_live_epoch(setup, images, epoch, advance), validate,
        lambda evaluated, record: _write_live_best(run, setup, evaluated, record), facts,
        images_per_epoch=n_train, extra_state=extra_state, on_resume=on_resume,
    )  # fmt: skip
    epochs = run_epochs(loop, progress, on_epoch_end)

    dist.barrier()  # rank 0's best.* is on disk
    best_model, written = _best_model(run, setup)
    scores = write_split_scores(
        run, dist, lambda split: _score(setup, best_model, images, images.ids(split)), [run.splits]
    )
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
        epochs.resumed_from,
        epochs.best,
        started,
        fingerprint=written.fingerprint or setup.base_fingerprint,
        backbone=str(settings.model.backbone),
        n_train=n_train,
        n_val_select=len(val_ids),
        scores=scores,
        n_failed=len(images.failed),
        notes=notes,
    )
