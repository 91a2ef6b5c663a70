"""One settings object for every stage: defaults < YAML (``--config``) < ``ROADWORK_*`` environment < flags.

The model is nested per layer and ``extra="forbid"`` everywhere, so a typo in a YAML key or an environment
variable is an error that names the key rather than a silently ignored setting.

Example:
    >>> settings = load_settings(None, {"train": {"epochs": 3}})
    >>> settings.train.epochs
    3
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from roadwork_cli.errors import UsageError

ENV_PREFIX = "ROADWORK_"
ENV_NESTING = "__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Category names that make a COCO image "roadwork" by default, matched case-insensitively with "_"/"-" read as spaces.
# They cover the ROADWork data set's object classes (cone, drum, vertical panel, tubular marker, work vehicle, ...),
# the construction classes of other driving sets (Argoverse's CONSTRUCTION_CONE / CONSTRUCTION_BARREL, Mapillary's
# "construction--barrier--*"-style names reduced to their last word) and common hand-made names. A box of any other
# category (a car, a person) leaves an image "no_roadwork". "*" in the list means: any annotation is roadwork.
DEFAULT_COCO_POSITIVE_CATEGORIES: tuple[str, ...] = (
    "cone",
    "cones",
    "traffic cone",
    "construction cone",
    "drum",
    "construction barrel",
    "barricade",
    "barrier",
    "jersey barrier",
    "temporary barrier",
    "vertical panel",
    "tubular marker",
    "delineator",
    "channelizer",
    "fence",
    "temporary fence",
    "work vehicle",
    "construction vehicle",
    "excavator",
    "worker",
    "construction worker",
    "police officer",
    "temporary traffic control sign",
    "temporary traffic control message board",
    "message board",
    "roadwork sign",
    "road work sign",
    "construction sign",
    "work zone sign",
    "arrow board",
    "bike lane",
    "other roadwork objects",
    "roadwork",
)


class DataSettings(_Section):
    """Where images come from and how they are split."""

    sources: list[str] = Field(
        default_factory=list,
        description="Data sources: class-subfolder trees, .csv/.jsonl manifests, .parquet files or folders, "
        "COCO .json, "
        "or 'synthetic:N'.",
    )
    seed: int = Field(0, description="Seed of the hash-based split assignment and of the synthetic generator.")
    fractions: tuple[float, float, float, float] = Field(
        (0.7, 0.1, 0.1, 0.1), description="Fractions of train / val_select / val_calib / test; must sum to 1."
    )
    group_by: Literal["auto", "none", "column", "filename", "near_duplicates"] = Field(
        "auto",
        description="Grouping that keeps related images in one split: 'column' uses a manifest/parquet group column "
        "(see group_column), 'filename' strips a trailing frame number (clip_0001.jpg -> clip), 'near_duplicates' "
        "groups images whose perceptual hashes (64-bit DCT pHash) differ by at most near_duplicate_bits bits, "
        "'auto' uses the group column where a sample has one and near-duplicate clusters elsewhere.",
    )
    group_column: str | None = Field(
        None,
        description="Manifest/parquet column holding the group (clip, sequence) of each image, e.g. 'clip_id'. Unset: "
        "the first of group, group_id, sequence, sequence_id, clip, clip_id, scene_id that exists. A named column "
        "missing from a manifest or parquet file is an error, and so is group_by 'column' with no group column.",
    )
    near_duplicate_bits: int = Field(
        8,
        ge=0,
        le=32,
        description="Hamming threshold on the 64-bit perceptual hash (imagehash's DCT pHash): images whose hashes "
        "differ in at most this many bits, and whose 8x8 colour thumbnails agree (near_duplicate_max_difference), are "
        "near-duplicates; clusters are reported by split and grouped by group_by 'near_duplicates'/'auto'. 8 found "
        "every JPEG re-encode and 0.5x resize and 98 % of 2 %-per-side crops of synthetic scenes, and merged no two of "
        "1,500 unrelated ones (one pair of the demo's 5,000); 0 = identical hashes only.",
    )
    near_duplicate_max_difference: float = Field(
        8.0,
        ge=0,
        le=255,
        description="Largest mean absolute difference (grey levels, 0-255) between the 8x8 colour thumbnails of two "
        "images whose hashes are within near_duplicate_bits, for them to count as near-duplicates: re-encodes, "
        "resizes and small crops differ by <= 7, unrelated look-alike scenes by >= 10.5; 255 = the hash alone decides.",
    )
    stratify: bool = Field(
        False,
        description="Balance each label exactly over the splits (largest-remainder counts per label, groups kept "
        "whole) instead of in expectation; for small sets. Deterministic, but adding images later can move earlier "
        "ones between splits.",
    )
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="Decompression-bomb limit: images with more pixels are rejected unread."
    )
    max_file_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Files larger than this many bytes are rejected.")
    decoder: Literal["pil", "cuda"] = Field(
        "pil",
        description="JPEG decoder of cache-features and train's scoring: 'pil' (DataLoader workers, the reference "
        "pixels) or 'cuda' (batches of JPEG bytes decoded on the GPU with nvjpeg and resized there; equal to pil "
        "within data.decode.CUDA_DECODE_TOLERANCE, tested on CUDA hosts). Features cached with cuda live in a "
        "'-cudadecode' folder of their own, never mixed with pil ones. cuda without a CUDA GPU is an error (exit 2).",
    )
    jpeg_draft: bool | None = Field(
        None,
        description="Decode large JPEGs at 1/2, 1/4 or 1/8 size straight from the DCT when that still covers the "
        "network input (much faster, same pixels at network size). One decode path: cache-features records it, and "
        "predict / evaluate --source follow the recorded choice; unset = on for cache-features and as recorded "
        "elsewhere, and a value that differs from the recorded one is warned about.",
    )
    coco_positive_categories: list[str] = Field(
        default_factory=lambda: list(DEFAULT_COCO_POSITIVE_CATEGORIES),
        min_length=1,
        description="COCO category names that make an image 'roadwork' (case-insensitive; '_' and '-' match spaces). "
        "Default: a roadwork list (cones, drums, barriers, signs, work vehicles, workers and the ROADWork data set's "
        "classes). '*' means any annotation makes an image roadwork. A name that matches no category of the file is "
        "an error.",
    )
    coco_image_dir: Path | None = Field(
        None,
        description="Folder holding a COCO file's images; by default they are looked for beside the json, in its "
        "'images/' subfolder, and in the standard layout's '../images/' and '../images/<split>/'.",
    )
    parquet_image_column: str | None = Field(
        None, description="Parquet column holding image bytes; auto-detected ('image', 'img', 'bytes') when unset."
    )
    synthetic_size: tuple[int, int] = Field((320, 240), description="Width and height of generated synthetic scenes.")
    synthetic_jpeg: bool = Field(True, description="Re-compress synthetic scenes as JPEG at a random quality.")
    augment: Literal["none", "moderate", "aggressive", "natix"] = Field(
        "moderate",
        description="Augmentation of training views (cached augmented views and the train loop): 'none' = the eval "
        "transform; 'moderate' / 'aggressive' = timm RandAugment presets; 'natix' = the NATIX validators' challenge "
        "levels 0-3 mixed by natix_levels. Each view is seeded from (image id, view, epoch).",
    )
    natix_levels: tuple[float, float, float, float] = Field(
        (0.25, 0.25, 0.25, 0.25),
        description="Probabilities of NATIX challenge levels 0-3 when augment is 'natix' (0: square centre crop; "
        "1: + rotation, random resized crop, flips; 2: + colour and JPEG degradation; 3: + noise and blur).",
    )

    @field_validator("natix_levels")
    @classmethod
    def _levels_are_probabilities(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if any(p < 0 for p in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"natix_levels must be four non-negative probabilities summing to 1, got {value}")
        return value

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if any(f < 0 for f in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be four non-negative numbers summing to 1, got {value}")
        if value[0] <= 0 or value[2] <= 0:
            raise ValueError("the train and val_calib fractions must be positive")
        return value


class PeftSettings(_Section):
    """Parameter-efficient tuning of the backbone (used by ``train --mode train`` only; see :data:`MODE_SCOPES`)."""

    method: Literal["none", "lora", "dora", "doran"] = Field(
        "none",
        description="Adapter kind: none (head only, on live features), LoRA or DoRA (through peft), or DoRAN (DoRA "
        "with a learnable stabiliser in the column-norm denominator and per-block generated low-rank factors).",
    )
    rank: int = Field(16, gt=0, description="Rank r of the low-rank update BA.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is multiplied by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Layers that get adapters: dotted-name suffixes inside numbered blocks ('qkv', 'mlp.fc1') or full "
        "dotted names; None = the backbone family's default (timm ViT/Eva: qkv, proj, fc1, fc2; transformers "
        "DINOv3: q_proj, k_proj, v_proj, o_proj, up_proj, down_proj; EfficientNet: the 1x1 convolutions).",
    )
    doran_generator_hidden: int = Field(
        8,
        ge=0,
        description="DoRAN: hidden width of the per-block generator that produces every targeted projection's "
        "low-rank factors from its seed factors; 0 = no generator (fixed factors per projection).",
    )
    doran_stabilizer: bool = Field(
        True,
        description="DoRAN: add the learnable softplus(theta) to the column norm; False sets it exactly to 0.",
    )
    doran_stabilizer_init: float = Field(
        1e-3, gt=0, description="DoRAN: initial value of softplus(theta), the stabiliser added to every column norm."
    )


class ModelSettings(_Section):
    """Backbone and head."""

    backbone: str = Field(
        "efficientnet_lite0",
        description="Registered backbone name (see `list_backbones()`), 'timm:<name>' or 'hf:<repo id or local dir>'.",
    )
    weights: Path | None = Field(None, description="Local weights file (safetensors or state dict) for the backbone.")
    image_size: int | None = Field(None, gt=0, description="Override of the backbone's input size (square).")
    head_hidden: int = Field(256, ge=0, description="Hidden width of the head's shared MLP; 0 means linear heads.")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the head's outputs.")
    head_standardize: bool = Field(
        False, description="Standardise each feature with the training set's mean and std before the head."
    )
    head_gate: Literal["shared", "crossfit"] = Field(
        "shared",
        description="shared: the gate is an output of the shared head layer, trained with the other losses. crossfit: "
        "the gate is its own layer on the detached hidden features and cls logit, fit after training on the "
        "out-of-fold correctness of train.gate_folds heads trained on folds of train (no gate loss reaches the cls "
        "output, and its targets are errors the head did not fit). Under train.cls_fit=logistic_cv either gate is "
        "fit after training on the out-of-fold errors of the logistic regression on train, the cls it is paired with.",
    )
    compile: bool = Field(False, description="Wrap the head with torch.compile (falls back cleanly when unavailable).")
    compile_backbone: bool = Field(
        False,
        description="train --mode train: torch.compile the backbone's training forward (adapters included; "
        "checkpointed chunks and DDP work with it). For GPU hosts, where the eager forward's many small kernels "
        "leave the GPU idle; the first steps pay for compiling. Off by default: compiled kernels round "
        "differently, so results are not bit-identical to the eager loop's. Scoring, EMA and the merged "
        "checkpoints stay eager.",
    )
    peft: PeftSettings = Field(default_factory=PeftSettings, description="Backbone adapters.")


CPU_BATCH_SIZE = 8
"""Images per forward pass on the CPU when the settings leave it unset. Small batches keep a small backbone's
activations in cache: with efficientnet_lite0 on 2 cores, predict ran 34 % and cache-features 25-60 % more images/s
than at 32 and 64 (benchmarks/RESULTS.md)."""


def _batch_size_field(per: str, gpu: int) -> Any:
    """A ``batch_size`` setting of images per ``per``: unset = :data:`CPU_BATCH_SIZE` on the CPU, ``gpu`` on a GPU."""
    return Field(
        None,
        gt=0,
        description=f"Images per {per}; unset = {CPU_BATCH_SIZE} on the CPU (small batches keep activations in "
        f"cache), {gpu} on a GPU.",
    )


def _workers_field() -> Any:
    """The ``workers`` setting of a stage that decodes images."""
    return Field(2, ge=0, description="DataLoader worker processes for decoding (GPU; CPU runs use streams).")


def _streams_field() -> Any:
    """The ``streams`` setting of a stage that decodes images and runs the forward on the CPU."""
    return Field(
        "auto",
        description="CPU streams, each decoding a batch and then running its forward on its own cores (runtime.threads "
        "intra-op threads each; unset: cores / streams); auto = cores / 2 (one stream on 2 cores; one per core for "
        "an ONNX bundle). Results do not depend on it at equal threads per stream.",
    )


def streams_value(value: int | str) -> int | str:
    """A ``streams`` setting as ``"auto"`` or a count >= 1 (``"4"`` from the environment becomes 4).

    Raises:
        ValueError: Anything else.
    """
    text = "" if isinstance(value, bool) else str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError("streams must be 'auto' or a count >= 1")


class FeatureSettings(_Section):
    """Backbone forward pass over every image, cached once."""

    batch_size: int | None = _batch_size_field("backbone forward", gpu=64)
    workers: int = _workers_field()
    streams: int | str = _streams_field()

    _streams_valid = field_validator("streams", mode="before")(classmethod(lambda cls, value: streams_value(value)))
    views: int = Field(0, ge=0, description="Extra augmented views cached per training image (0 = only the clean one).")
    shard_size: int = Field(2048, gt=0, description="Feature rows per safetensors shard (also the resume granularity).")
    channels_last: bool = Field(True, description="Use channels-last memory format for the backbone forward.")


class LossWeights(_Section):
    """Weights of the train_cached objective's parts."""

    cls: float = Field(1.0, ge=0, description="Cross-entropy of the cls output on all samples.")
    selective: float = Field(1.0, ge=0, description="SelectiveNet selective risk of cls weighted by the gate.")
    coverage_penalty: float = Field(16.0, ge=0, description="Lambda of SelectiveNet's quadratic coverage penalty.")
    aux: float = Field(0.5, ge=0, description="Cross-entropy of the auxiliary output on all samples.")
    fn_weight: float = Field(2.0, ge=0, description="Extra weight on missed roadwork (false negatives).")
    gate_correctness: float = Field(
        1.0,
        ge=0,
        description="Cross-entropy of the gate against the probability the (detached) cls output gives the true "
        "label; keeps the gate from saturating once the training set is fit.",
    )
    conformal: float = Field(
        1.0,
        ge=0,
        description="train_crc only: weight of the conformal-training term (smoothed error on exits + FNR-on-exits "
        "excess over calibration.fnr + shortfall below calibration.coverage of the coverage affordable at that FNR, "
        "under thresholds fitted on the other half of each batch).",
    )


class TrainSettings(_Section):
    """Optimisation of the head (and adapters)."""

    mode: Literal["train_cached", "train", "train_crc"] = Field("train_cached", description="Training mode.")
    epochs: int = Field(30, gt=0, description="Passes over the training set.")
    batch_size: int = Field(256, gt=0, description="Samples per optimiser step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up length before the cosine decay.")
    min_steps_per_epoch: int = Field(
        1, gt=0, description="Smaller batches for small training sets, so every epoch takes at least this many steps."
    )
    refit: bool = Field(
        False,
        description="After selecting the best epoch on val_select, retrain on train + val_select for that many "
        "epochs and keep that head (val_calib is never used). scores/val_select.csv still comes from the head fit on "
        "train alone, so calibration fits its scaling on held-out scores.",
    )
    cls_fit: Literal["logistic_cv", "sgd"] = Field(
        "logistic_cv",
        description="How the head's cls (roadwork) logit is fit in train_cached / train_crc. logistic_cv: an L2 "
        "logistic regression on the standardised features, solved exactly, its strength chosen by 5-fold "
        "cross-validation on train + val_select and refit there (never val_calib); val_select is scored by the same "
        "fit on train alone; aux stays the trained head's, the gate is refit on the regression's out-of-fold errors. "
        "sgd: the cls output of the trained head (the loss terms fn_weight etc. shape it).",
    )
    ema_decay: float = Field(0.99, ge=0, lt=1, description="Decay of the weight EMA; 0 disables EMA.")
    target_coverage: float = Field(0.8, gt=0, le=1, description="Coverage the SelectiveNet gate is trained towards.")
    loss: LossWeights = Field(default_factory=LossWeights, description="Weights of the objective's parts.")
    crc_temperature: float = Field(
        0.5,
        gt=0,
        description="train_crc: temperature (in logit units) of the sigmoids that relax the thresholds, the quantiles "
        "and the exit / decision indicators of the conformal-training term; smaller is closer to the hard rule.",
    )
    gate_folds: int = Field(
        5, ge=2, description="model.head_gate=crossfit: folds of train, one extra head each, for out-of-fold targets."
    )
    crc_score: Literal["gate", "softmax_response"] = Field(
        "gate",
        description="train_crc: the selection score the simulated rule exits on (the gate head, or max(p, 1-p) of "
        "the Platt-scaled p, as calibration ranks it); "
        "match calibration.gate_score.",
    )
    select_metric: Literal["mcc", "accuracy", "auroc", "aurc"] = Field(
        "mcc", description="Model-selection metric on val_select (AURC breaks ties)."
    )
    seed: int = Field(0, description="Seed of initialisation, shuffling and augmentation.")
    optimizer: Literal["adamw", "sam", "fsam"] = Field(
        "adamw",
        description="train mode: adamw; sam (sharpness-aware: AdamW step at the worst point within radius sam_rho); "
        "fsam (Friendly SAM: the ascent direction drops the gradient's running-mean component).",
    )
    sam_rho: float = Field(0.05, gt=0, description="SAM / F-SAM: radius rho of the weight perturbation.")
    fsam_sigma: float = Field(
        1.0, ge=0, description="F-SAM: sigma, how much of the gradient's running mean the ascent direction drops."
    )
    fsam_lambda: float = Field(0.9, ge=0, lt=1, description="F-SAM: lambda, decay of the running mean of the gradient.")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="train mode: layer-wise LR decay of the backbone's trainable parameters: a layer k groups below "
        "the top gets lr * layer_decay**k; None or 1.0 = off.",
    )
    head_lr: float | None = Field(
        None, gt=0, description="train mode: peak learning rate of the head; None = train.lr."
    )
    adapter_lr: float | None = Field(
        None,
        gt=0,
        description="train mode: peak learning rate of the backbone adapters (before layer decay); None = train.lr.",
    )
    accumulate: int = Field(
        1, ge=1, description="train mode: batches whose gradients are summed before one optimiser step."
    )
    warm_start: bool = Field(
        True,
        description="train mode: start the head from the run's finished train_cached head when it was trained on "
        "the same backbone (same fingerprint) and not refit on val_select (train.refit); False starts from a fresh "
        "head.",
    )
    grad_clip: float | None = Field(
        None,
        gt=0,
        description="train mode: clip the global gradient norm of the trainable parameters to this; None = off.",
    )


class CalibrationSettings(_Section):
    """Probability scaling and SCRC-I thresholds (the guarantee)."""

    fnr: float = Field(0.02, gt=0, lt=1, description="alpha: maximum false-negative rate among exits.")
    coverage: float = Field(0.8, ge=0, le=1, description="xi: the fraction of images that must exit stage 1.")
    delta: float = Field(0.1, gt=0, lt=1, description="delta: allowed probability that the guarantee fails.")
    delta_coverage_share: float = Field(
        0.5, gt=0, lt=1, description="Share of delta spent on the coverage bound (delta1 = share * delta)."
    )
    method: Literal["scrc", "crc", "sets"] = Field(
        "scrc", description="scrc: high-probability SCRC-I; crc: CRC in expectation; sets: prediction sets."
    )
    scaling: Literal["none", "temperature", "platt", "dirichlet"] = Field(
        "platt",
        description="Probability scaling of p(roadwork), fit on val_select. Platt (scale + shift) also undoes the bias "
        "that the false-negative weight puts into the head; temperature only rescales.",
    )
    gate_scaling: Literal["none", "platt"] = Field("platt", description="Scaling of the gate score, fit on val_select.")
    gate_score: Literal["auto", "gate", "softmax_response"] = Field(
        "auto",
        description="Selection score: the gate head, max(p, 1-p) (softmax response), or auto = the one with the "
        "lower AURC on val_select (chosen before val_calib is seen).",
    )
    rule: Literal["gate", "band", "sets"] = Field(
        "gate",
        description="Stage-1 rule certified by SCRC-I. gate: exit iff the selection score g >= lambda, then roadwork "
        "iff p >= tau. band: no_roadwork iff p < tau, roadwork iff p >= b, defer iff tau <= p < b (b from a grid of "
        "val_select quantiles of p, Bonferroni over it; the selection score plays no role). band needs method=scrc. "
        "sets: conformal prediction sets (implied by method=sets).",
    )
    grid_size: int = Field(
        10, gt=0, description="Number of lambda (rule gate) or b (rule band) values, fixed before seeing val_calib."
    )
    objective: Literal["accuracy", "coverage", "mcc"] = Field(
        "accuracy", description="Pick among certified pairs by this on exits (ties broken by coverage)."
    )
    allow_infeasible: bool = Field(False, description="Exit 0 even if the targets are unattainable.")
    infeasible_decisions: Literal["defer", "fallback"] = Field(
        "defer",
        description="What an infeasible calibration (targets not certified) decides. defer: every image goes to stage "
        "2 (the safe choice); fallback: the fallback thresholds (largest certified coverage), with no guarantee.",
    )
    scores_select_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="calibrate --scores only: fraction of rows (seeded random) held out to fit scaling and the lambda "
        "grid; 0 = no scaling and a data-free lambda grid on the score scale, every row calibrates thresholds.",
    )


class ExportSettings(_Section):
    """Deployment bundle."""

    out: Path | None = Field(None, description="Bundle path; default <run>/bundle.tar.")
    include_backbone_weights: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: embed backbone weights unless it is a named offline/hub model with a fingerprint."
    )
    allow_uncertified: bool = Field(
        False,
        description="Export a run whose calibration did not certify its targets (feasible: false); refused "
        "otherwise, and warned about when allowed: such a bundle carries no guarantee.",
    )
    onnx: bool = Field(
        True,
        description="Also write model.onnx (backbone + head in one graph, verified against PyTorch at export), which "
        "predict, serve and load_bundle run with onnxruntime, without importing torch. A backbone whose graph cannot "
        "be exported or does not verify is left out with a warning (the reason goes into the manifest), and the "
        "bundle then runs with PyTorch.",
    )


class PredictSettings(_Section):
    """Inference on new images."""

    batch_size: int | None = _batch_size_field("forward pass", gpu=32)
    workers: int = _workers_field()
    streams: int | str = _streams_field()

    _streams_valid = field_validator("streams", mode="before")(classmethod(lambda cls, value: streams_value(value)))
    format: Literal["auto", "table", "jsonl", "csv"] = Field(
        "auto", description="Output format; auto = table on a terminal, jsonl otherwise."
    )
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="What computes the scores in predict, serve and the NATIX detector: auto = the bundle's model.onnx "
        "with onnxruntime when it has one and runs on the CPU in fp32 (`roadwork info BUNDLE` says which and why), "
        "else PyTorch; onnx or torch force one.",
    )


class ServeSettings(_Section):
    """``roadwork serve``: the HTTP service over one loaded bundle."""

    host: str = Field(
        "127.0.0.1",
        description="Address to bind: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface; put it behind "
        "a proxy that authenticates).",
    )
    port: int = Field(8000, ge=1024, le=65535, description="TCP port to listen on.")
    workers: int = Field(1, ge=1, description="Inference worker processes, each holding one loaded bundle.")
    max_batch_size: int = Field(
        8, ge=1, description="Most requests one worker gathers into one forward pass (dynamic batching)."
    )
    batch_timeout_ms: float = Field(
        5.0,
        ge=0,
        description="How long a worker waits for more requests to fill a batch once one has arrived; 0 = take what "
        "is queued.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="A request not answered within this many seconds gets 504 (queueing included)."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Larger request bodies are refused with 413 before they are read whole."
    )
    max_images_per_request: int = Field(64, ge=1, description="More images in one request are refused with 413.")
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM/SIGINT, how long to wait for in-flight requests before stopping anyway.",
    )
    quiet: bool = Field(False, description="No log line per request (warnings and errors only).")


class RuntimeSettings(_Section):
    """Where and how work runs."""

    run: Path | None = Field(None, description="Run directory holding every stage's artifacts.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision; auto = bf16 on CUDA with bf16 support, fp32 on CPU."
    )
    threads: int | None = Field(None, gt=0, description="torch intra-op threads; default: torch's own choice.")
    debug: bool = Field(False, description="Show tracebacks on errors.")


class Settings(_Section):
    """Every setting of every stage, resolved from defaults, YAML, environment and flags."""

    data: DataSettings = Field(default_factory=DataSettings, description="Sources and splits.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Backbone, head and adapters.")
    features: FeatureSettings = Field(default_factory=FeatureSettings, description="Feature cache.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Training.")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings, description="Calibration.")
    export: ExportSettings = Field(default_factory=ExportSettings, description="Bundle.")
    predict: PredictSettings = Field(default_factory=PredictSettings, description="Inference.")
    serve: ServeSettings = Field(default_factory=ServeSettings, description="HTTP service (roadwork serve).")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings, description="Run directory and device.")

    def to_yaml(self) -> str:
        """The resolved settings as YAML (paths as strings, tuples as lists)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


@dataclass(frozen=True)
class ModeScope:
    """Settings that only some training modes read; set in another mode, they get one note instead of nothing.

    Attributes:
        keys: Dotted setting names; a section (``model.peft``) stands for each of its fields.
        modes: The ``train.mode`` values that read them.
        otherwise: What the other modes do instead, ``{mode}`` standing for the chosen one.
    """

    keys: tuple[str, ...]
    modes: tuple[str, ...]
    otherwise: str


MODE_SCOPES: tuple[ModeScope, ...] = (
    ModeScope(
        keys=(
            "train.optimizer",
            "train.sam_rho",
            "train.fsam_sigma",
            "train.fsam_lambda",
            "train.accumulate",
            "train.head_lr",
            "train.adapter_lr",
            "train.layer_decay",
            "train.grad_clip",
            "train.warm_start",
            "model.peft",
        ),
        modes=("train",),
        otherwise="{mode} fits the head alone on cached features of the frozen backbone, with AdamW at train.lr",
    ),
    ModeScope(
        keys=("train.crc_temperature", "train.crc_score", "train.loss.conformal"),
        modes=("train_crc",),
        otherwise="{mode} has no conformal-training term",
    ),
)
"""The one place that says which settings a training mode ignores (:func:`mode_notes` words it)."""


def _value_at(settings: BaseModel, key: str) -> Any:
    for part in key.split("."):
        settings = getattr(settings, part)
    return settings


def _leaf_keys(key: str) -> list[str]:
    """``key`` itself, or each field of the section it names (``model.peft`` -> ``model.peft.method``, ...)."""
    section = _model_at(key.split("."))
    return [f"{key}.{name}" for name in section.model_fields] if section is not None else [key]


def ignored_settings(settings: Settings) -> dict[ModeScope, list[str]]:
    """Per scope, the dotted settings that differ from their defaults but that ``settings.train.mode`` does not read."""
    defaults = Settings()
    ignored = {}
    for scope in MODE_SCOPES:
        if settings.train.mode in scope.modes:
            continue
        keys = [leaf for key in scope.keys for leaf in _leaf_keys(key)]
        changed = [key for key in keys if _value_at(settings, key) != _value_at(defaults, key)]
        if changed:
            ignored[scope] = changed
    return ignored


def mode_notes(settings: Settings) -> list[str]:
    """One line per :data:`MODE_SCOPES` entry whose settings the chosen mode ignores, naming every such setting.

    Example:
        >>> [note] = mode_notes(load_settings(None, {"model": {"peft": {"method": "lora"}}}, environ={}))
        >>> note.split(";")[0]
        'model.peft.method applies to --mode train only'
    """
    mode = settings.train.mode
    return [
        f"{', '.join(keys)} {'applies' if len(keys) == 1 else 'apply'} to --mode {' / '.join(scope.modes)} only; "
        f"{scope.otherwise.format(mode=mode)}."
        for scope, keys in ignored_settings(settings).items()
    ]


def resolve_batch_size(requested: int | None, device_type: str, gpu: int) -> int:
    """``requested``, else :data:`CPU_BATCH_SIZE` on the CPU and ``gpu`` on an accelerator."""
    if requested is not None:
        return int(requested)
    return CPU_BATCH_SIZE if device_type == "cpu" else gpu


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; ``None`` values in ``update`` are skipped."""
    merged = dict(base)
    for key, value in update.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            # Merge into a fresh mapping too, so that None leaves (flags not given) never reach validation.
            current = merged.get(key)
            merged[key] = deep_merge(dict(current) if isinstance(current, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def _model_at(path: Sequence[str]) -> type[BaseModel] | None:
    """The settings section at ``path`` (``()`` is the root), or None where the path leaves the sections."""
    model: type[BaseModel] = Settings
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _is_sequence_field(path: Sequence[str]) -> bool:
    """Whether the setting at ``path`` holds a list or tuple (also inside ``X | None``)."""
    section = _model_at(path[:-1])
    field = section.model_fields.get(path[-1]) if section is not None and path else None
    if field is None:
        return False
    annotations = [field.annotation, *get_args(field.annotation)]
    return any(get_origin(a) in (list, tuple, set) or a in (list, tuple, set) for a in annotations)


def _parse_env_value(raw: str, sequence: bool = False) -> Any:
    """A value from the environment: JSON where it parses (numbers, ``["a", "b"]``), else the string.

    For list and tuple settings a value that is not a JSON list is split on commas, so ``x.csv`` (one value) and
    ``a/,b.csv`` both work.
    """
    if sequence and not raw.strip().startswith("["):
        return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _env_entries(environ: Mapping[str, str]) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """``(key path, variable name, raw value)`` for every ``ROADWORK_*`` variable, in name order."""
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTING) if part)
        if path:
            yield path, name, environ[name]


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested settings from ``ROADWORK_SECTION__KEY=value`` variables (``__`` nests, case-insensitive)."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    for path, name, raw in _env_entries(environ):
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"Environment variable {name} nests under a key that is not a section.")
        node[path[-1]] = _parse_env_value(raw, _is_sequence_field(path))
    return tree


def settings_from_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML settings file; an unreadable or non-mapping file is a usage error."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"Settings file {path} does not exist.") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"Settings file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"Settings file {path} must hold a mapping of sections (data, model, train, ...).")
    return loaded


def _did_you_mean(loc: Sequence[str]) -> str:
    """A hint for an unknown key: the closest field of its section, else the section's keys."""
    section = _model_at(loc[:-1])
    if section is None or not loc:
        return ""
    fields = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]).lower(), fields, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?"
    return f"; valid keys here: {', '.join(fields)}"


def _env_variable_for(loc: Sequence[Any], env_names: Mapping[tuple[str, ...], str]) -> str | None:
    """The environment variable that set the value at ``loc`` (or a key under / above it), if any."""
    key = tuple(str(part) for part in loc)
    for path, name in env_names.items():
        if path[: len(key)] == key or key[: len(path)] == path:
            return name
    return None


def describe_validation_error(
    exc: ValidationError, origin: str = "settings", env_names: Mapping[tuple[str, ...], str] | None = None
) -> str:
    """One paragraph naming every bad key, e.g. ``train.epochs: Input should be greater than 0 (got -1)``.

    Args:
        exc: The pydantic error.
        origin: What was being validated, for the message's first words.
        env_names: Key path -> environment variable, for values that came from the environment; such errors name
            the variable (``ROADWORK_TRAIN__EPOCS``) since that is what the user has to fix.
    """
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        key = ".".join(loc) or "(root)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        given = error.get("input")
        shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
        variable = _env_variable_for(error["loc"], env_names or {})
        where = f" (from environment variable {variable})" if variable else ""
        parts.append(f"{key}: {message}{shown}{where}")
    return f"Invalid {origin}: " + "; ".join(parts) + "."


def _flag_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Key paths of the non-None leaves of a nested mapping."""
    paths: set[tuple[str, ...]] = set()
    for key, value in tree.items():
        if isinstance(value, Mapping):
            paths |= _flag_paths(value, (*prefix, str(key)))
        elif value is not None:
            paths.add((*prefix, str(key)))
    return paths


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings: defaults < YAML file < ``ROADWORK_*`` environment < ``overrides`` (flags).

    Args:
        config_file: Optional YAML file of nested sections.
        overrides: Nested mapping from command-line flags; ``None`` leaves are ignored (flag not given).
        environ: Environment to read (default ``os.environ``).

    Raises:
        UsageError: A key is unknown or a value invalid; the message names the key.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged = deep_merge(merged, settings_from_yaml(config_file))
    merged = deep_merge(merged, settings_from_env(environ))
    if overrides:
        merged = deep_merge(merged, overrides)
    flagged = _flag_paths(overrides or {})
    env_names = {path: name for path, name, _ in _env_entries(environ) if path not in flagged}
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise UsageError(describe_validation_error(exc, env_names=env_names)) from None
