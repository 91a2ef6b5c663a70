"""Stage 1 as a library: backbone + selective head + calibrated exit rule -> one decision per image.

``Stage1Model`` is what ``roadwork predict`` runs and what ``roadwork export`` packs. It is built from a run directory
(``Stage1Model.from_run``) or from a verified bundle (``load_bundle``); either way the backbone's fingerprint is
re-computed and checked against the one recorded at training time, so a head never silently runs on features it was
not trained on.

Example:
    >>> from roadwork_cli import load_bundle  # doctest: +SKIP
    >>> model = load_bundle("runs/demo/bundle.tar")  # doctest: +SKIP
    >>> model.predict(["street.jpg"])[0].decision  # doctest: +SKIP
    'roadwork'
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from roadwork_cli.errors import BundleError, UsageError
from roadwork_cli.io.atomic import atomic_path, read_json
from roadwork_cli.io.run import RunDir

if TYPE_CHECKING:
    from PIL import Image

    from roadwork_cli.config import Settings

DECISIONS = ("roadwork", "no_roadwork", "defer")

# Bundle member names (DESIGN.md, "Artifacts").
MODEL_JSON = "model.json"
HEAD_WEIGHTS = "model_best.safetensors"
BACKBONE_WEIGHTS = "backbone.safetensors"
SCALING_JSON = "scaling.json"
SCRC_PARAMS_JSON = "scrc_params.json"
SPLITS_JSON = "splits.json"
METRICS_CSV = "metrics.csv"
MODEL_FORMAT = 1


@dataclass
class Prediction:
    """Stage 1's answer for one input.

    Attributes:
        path: The input as given (a path string, or ``<image N>`` for an in-memory image).
        p_roadwork: Calibrated probability of roadwork; ``None`` when the input could not be read.
        gate: Calibrated selection score (exit iff it clears the calibrated threshold); ``None`` on error.
        decision: ``roadwork``, ``no_roadwork`` or ``defer`` (send to stage 2); ``None`` on error.
        error: ``None``, or why this input could not be scored.
    """

    path: str
    p_roadwork: float | None
    gate: float | None
    decision: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ImageInput = "str | os.PathLike[str] | Image.Image"


def _describe(item: Any, index: int) -> str:
    if isinstance(item, str | os.PathLike):
        return os.fspath(item)
    if isinstance(item, bytes | bytearray | memoryview):
        return f"<bytes {index}>"
    return f"<image {index}>"


def jpeg_draft_size(preprocessing: Any) -> int:
    """Smallest shorter side the eval transform needs before its resize (size / crop_pct, rounded up)."""
    size = preprocessing.size
    side = max(size) if isinstance(size, tuple | list) else int(size)
    crop_pct = float(getattr(preprocessing, "crop_pct", 1.0) or 1.0)
    return int(math.ceil(side / min(crop_pct, 1.0)))


class FastEvalTransform:
    """``eval_transform`` with its ``ToTensor`` + ``Normalize`` tail done in NumPy.

    The PIL steps (resize, centre crop) are the data layer's own objects, so the pixels are identical; only the
    uint8 -> normalised float conversion moves to NumPy, which is ~100x faster than torch's on a CPU whose intra-op
    thread pool is busy with the forward pass (torch's strided uint8 -> float copy with >1 thread stalls for ~20 ms per
    image there). Falls back to the whole original transform when its layout is not the expected one.
    """

    def __init__(self, transform: Callable):
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        self.original = transform
        self.pil_steps: list[Callable] | None = None
        if len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize):
            norm = steps[-1]
            self.pil_steps = steps[:-2]
            self.scale = (1.0 / (255.0 * np.asarray(norm.std, dtype=np.float32))).reshape(1, 1, -1)
            self.shift = (np.asarray(norm.mean, dtype=np.float32) / np.asarray(norm.std, dtype=np.float32)).reshape(
                1, 1, -1
            )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.pil_steps is None:
            return self.original(image)
        for step in self.pil_steps:
            image = step(image)
        pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        normalised = pixels * self.scale - self.shift  # (x / 255 - mean) / std
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))  # (3, H, W)


class _ImageDataset(Dataset):
    """Decodes and transforms one input per item; a bad input becomes a reason, never an exception."""

    def __init__(
        self, items: Sequence[Any], transform: Callable, max_pixels: int, max_file_bytes: int, draft_side: int | None
    ):
        self.items = list(items)
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.draft_side = draft_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[index]
        try:
            image = _load(item, self.max_pixels, self.max_file_bytes, self.draft_side)
            tensor = self.transform(image)  # (3, H, W)
        except Exception as exc:  # noqa: BLE001 - any failure of one input is reported for that input only
            return index, None, _reason(exc)
        return index, tensor, None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # ImageRejected carries the short reason without the locator
    if reason:
        return str(reason)
    message = str(exc).strip()
    return message if message else type(exc).__name__


def _load(item: Any, max_pixels: int, max_file_bytes: int, draft_side: int | None) -> Image.Image:
    from PIL import Image

    from roadwork_cli.data.images import decode_image, read_bytes

    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, bytes | bytearray | memoryview):
        data = bytes(item)  # an encoded image already in memory (e.g. piped to `roadwork predict -`)
        if len(data) > max_file_bytes:
            raise ValueError(f"too large: {len(data)} bytes > {max_file_bytes}")
    else:
        data = read_bytes(os.fspath(item), max_file_bytes)
    if draft_side is not None:
        fast = _decode_jpeg_draft(data, max_pixels, draft_side)
        if fast is not None:
            return fast
    return decode_image(data, max_pixels)


def _decode_jpeg_draft(data: bytes, max_pixels: int, draft_side: int) -> Image.Image | None:
    """Decode a large JPEG at 1/2, 1/4 or 1/8 scale straight from the DCT when that still covers ``draft_side``.

    JPEG decoding dominates CPU inference cost and libjpeg's DCT scaling skips most of it. PIL only picks a scale
    whose result is at least the requested size in both dimensions, so the eval transform's resize never upsamples.
    Anything that is not a plain, complete JPEG returns ``None`` and goes through the validating ``decode_image``,
    which reports the reason.
    """
    import io

    from PIL import Image, ImageOps

    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        width, height = image.size
        if width * height > max_pixels or min(width, height) < 2 * draft_side:
            return None  # too large: let the validator reject it; too small: no DCT scale applies
        image.draft("RGB", (draft_side, draft_side))
        image.load()
        oriented = ImageOps.exif_transpose(image)
        return oriented if oriented.mode == "RGB" else oriented.convert("RGB")
    except Exception:  # noqa: BLE001 - fall back to the validating decoder, which names the problem
        return None


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    indices = [i for i, t, _ in batch if t is not None]
    tensors = [t for _, t, _ in batch if t is not None]
    errors = [(i, e) for i, t, e in batch if t is None]
    stacked = torch.stack(tensors) if tensors else None  # (B, 3, H, W)
    return indices, stacked, errors


class Stage1Model:
    """Backbone + selective head + calibrated exit rule.

    Args:
        backbone: Feature extractor, (B, 3, H, W) -> (B, D).
        head: ``SelectiveHead``, (B, D) -> HeadOutput(cls, gate, aux) logits.
        rule: ``StageRule`` that calibrates raw scores and decides roadwork / no_roadwork / defer.
        info: Provenance (backbone spec and fingerprint, head config, preprocessing) as written to model.json.
        device: Where to run; default ``auto``.
        max_pixels: Decompression-bomb limit for inputs.
        precision: ``auto`` (bf16 autocast on CUDA with bf16, else fp32), ``fp32``, ``bf16`` or ``fp16``.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Module,
        rule: Any,
        info: dict[str, Any] | None = None,
        device: str | torch.device = "auto",
        max_pixels: int = 50_000_000,
        max_file_bytes: int = 64 * 1024 * 1024,
        channels_last: bool = True,
        precision: str = "auto",
    ):
        from roadwork_cli.data.transforms import eval_transform
        from roadwork_cli.model.device import compute_dtype, resolve_device

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.compute_dtype = compute_dtype(self.device, precision)
        self.backbone = backbone.eval().to(self.device)
        self.head = head.eval().to(self.device)
        self.channels_last = channels_last
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.rule = rule
        self.info = dict(info or {})
        self.preprocessing = backbone.preprocessing
        self.transform = FastEvalTransform(eval_transform(self.preprocessing))
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.fast_jpeg = True

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_run(
        cls, run: RunDir | str | Path, device: str = "auto", calibrated: bool = True, precision: str = "auto"
    ) -> Stage1Model:
        """Build from a trained and calibrated run directory (checkpoints/best.* and calibration/*).

        Args:
            run: The run directory.
            device: Where to run.
            calibrated: Require calibration/scrc_params.json; with ``False`` a model without a rule is returned
                (only ``raw_scores`` works), which is what scoring a new source for calibration needs.
        """
        run = run if isinstance(run, RunDir) else RunDir(run)
        best = run.require(run.checkpoints / "best.safetensors", "train")
        best_json = read_json(run.require(run.checkpoints / "best.json", "train"))
        rule = None
        if calibrated or run.scrc_params.exists():
            params = read_json(run.require(run.scrc_params, "calibrate"))
            scaling = read_json(run.scaling) if run.scaling.exists() else None
            rule = _build_rule(scaling, params)
        weights = _run_backbone_weights(run, best_json)
        backbone = _build_backbone(_backbone_record(best_json), weights_file=weights)
        head = _build_head(best_json, best.read_bytes(), backbone)
        return cls(backbone, head, rule, info=model_record(best_json, backbone), device=device, precision=precision)

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        device: str = "auto",
        backbone_weights: str | Path | None = None,
        precision: str = "auto",
    ) -> Stage1Model:
        """Verify ``path`` (checksums, versions, safe member names) and build the model from it.

        Args:
            path: bundle.tar from ``roadwork export``.
            device: Where to run.
            backbone_weights: Local backbone weights for a bundle exported without them; their fingerprint must
                match the recorded one.
        """
        from roadwork_cli.io.bundle import read_bundle

        contents = read_bundle(path)
        for name in (MODEL_JSON, HEAD_WEIGHTS, SCRC_PARAMS_JSON):
            if name not in contents.members:
                raise BundleError(f"Bundle {path} has no {name!r}; re-export it with `roadwork export`.")
        record = contents.json(MODEL_JSON)
        if int(record.get("format", 1)) > MODEL_FORMAT:
            raise BundleError(
                f"Bundle {path} model.json format {record.get('format')} is newer than the supported {MODEL_FORMAT}."
            )
        scaling = contents.json(SCALING_JSON) if SCALING_JSON in contents.members else None
        params = contents.json(SCRC_PARAMS_JSON)
        with tempfile.TemporaryDirectory(prefix="roadwork-bundle-") as tmp:
            weights = Path(backbone_weights) if backbone_weights else None
            if weights is None and BACKBONE_WEIGHTS in contents.members:
                weights = Path(tmp) / BACKBONE_WEIGHTS
                weights.write_bytes(contents.members[BACKBONE_WEIGHTS])
            backbone = _build_backbone(record["backbone"], weights_file=weights)
        head = _build_head(record, contents.members[HEAD_WEIGHTS], backbone)
        rule = _build_rule(scaling, params)
        model = cls(backbone, head, rule, info=record, device=device, precision=precision)
        model.info["manifest"] = contents.manifest.to_dict()
        return model

    # ----------------------------------------------------------------------------------------------- inference
    def loader(self, images: Sequence[Any], batch_size: int = 32, workers: int = 0) -> DataLoader:
        """A DataLoader that decodes and transforms ``images`` (in ``workers`` processes when > 0)."""
        draft = jpeg_draft_size(self.preprocessing) if self.fast_jpeg else None
        dataset = _ImageDataset(images, self.transform, self.max_pixels, self.max_file_bytes, draft)
        n_batches = math.ceil(len(dataset) / max(batch_size, 1))
        # One batch has nothing to overlap with: a worker process would only add its start-up time.
        workers = 0 if n_batches <= 1 else max(0, min(workers, n_batches))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )

    @torch.inference_mode()
    def forward_raw(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw (uncalibrated) p_roadwork and gate for a preprocessed batch (B, 3, H, W)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        from roadwork_cli.model.device import autocast

        with autocast(self.device, self.compute_dtype):
            features = self.backbone(batch)  # (B, D)
        out = self.head(features.float())
        p = torch.sigmoid(out.cls.float()).cpu().numpy()  # (B,)
        g = torch.sigmoid(out.gate.float()).cpu().numpy()  # (B,)
        return p.astype(np.float64), g.astype(np.float64)

    def iter_raw_scores(
        self,
        images: Sequence[Any],
        batch_size: int = 32,
        workers: int = 0,
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """Raw scores batch by batch, in input order: ``(indices, p_raw, g_raw, failed)`` per batch.

        ``indices`` are the positions of the inputs scored in this batch (``p_raw``/``g_raw`` shape (B,)), and
        ``failed`` pairs each unreadable input's position with its reason. Every position of one batch is lower than
        every position of the next, so consumers can emit results as each batch finishes.
        """
        for indices, batch, failed in self.loader(images, batch_size, workers):
            if batch is None:
                yield indices, np.zeros(0), np.zeros(0), failed
                continue
            p, g = self.forward_raw(batch)
            yield indices, p, g, failed

    def raw_scores(
        self,
        images: Sequence[Any],
        batch_size: int = 32,
        workers: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Raw p_roadwork and gate per input (NaN where an input failed) and the failure reasons."""
        n = len(images)
        p_raw = np.full(n, np.nan)
        g_raw = np.full(n, np.nan)
        errors: list[str | None] = [None] * n
        for indices, p, g, failed in self.iter_raw_scores(images, batch_size, workers):
            for index, reason in failed:
                errors[index] = reason
            p_raw[indices] = p
            g_raw[indices] = g
            if progress is not None:
                progress(len(indices) + len(failed))
        return p_raw, g_raw, errors

    def iter_predict(
        self,
        images: Sequence[Any],
        batch_size: int = 32,
        workers: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Prediction]:
        """One ``Prediction`` per input, in input order, yielded as each batch finishes.

        Unreadable inputs get ``error`` set, never an exception. Stopping the iteration early (or Ctrl-C) keeps
        everything already yielded valid: each prediction depends on its own image only.

        Args:
            images: Paths (str / Path), parquet row locators (``file.parquet#row=3``), PIL images or encoded image
                bytes.
            batch_size: Images per forward pass.
            workers: DataLoader worker processes that decode and resize (0 = in this process).
            progress: Called with the number of inputs finished after each batch.
        """
        if isinstance(images, str | os.PathLike):
            images = [images]
        if self.rule is None:
            raise UsageError("This model has no calibration; run `roadwork calibrate` before predicting decisions.")
        for indices, p_raw, g_raw, failed in self.iter_raw_scores(images, batch_size, workers):
            done: dict[int, Prediction] = {
                index: Prediction(_describe(images[index], index), None, None, None, reason) for index, reason in failed
            }
            if indices:
                p_cal, g_cal = self.rule.calibrate(p_raw, g_raw)
                decisions = self.rule.decide(p_raw, g_raw)
                for j, index in enumerate(indices):
                    done[index] = Prediction(
                        _describe(images[index], index), float(p_cal[j]), float(g_cal[j]), str(decisions[j])
                    )
            yield from (done[index] for index in sorted(done))
            if progress is not None:
                progress(len(done))

    def predict(
        self,
        images: Sequence[Any],
        batch_size: int = 32,
        workers: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> list[Prediction]:
        """All of :meth:`iter_predict` as a list (same arguments)."""
        return list(self.iter_predict(images, batch_size, workers, progress))

    def predict_proba(self, images: Sequence[Any], batch_size: int = 32, workers: int = 0) -> np.ndarray:
        """Calibrated P(roadwork) per input, shape (N,); NaN where an input could not be read."""
        predictions = self.predict(images, batch_size, workers)
        return np.array([np.nan if p.p_roadwork is None else p.p_roadwork for p in predictions], dtype=np.float64)


def load_bundle(
    path: str | Path, device: str = "auto", backbone_weights: str | Path | None = None, precision: str = "auto"
) -> Stage1Model:
    """Verify and load a bundle written by ``roadwork export`` (see ``Stage1Model.from_bundle``)."""
    return Stage1Model.from_bundle(path, device=device, backbone_weights=backbone_weights, precision=precision)


# --------------------------------------------------------------------------------------------------- building blocks
def _backbone_record(best_json: dict[str, Any]) -> dict[str, Any]:
    """The backbone part of a checkpoint record: ``{"spec": ..., "fingerprint": ...}``."""
    record = best_json.get("backbone")
    if not isinstance(record, dict):
        raise UsageError("checkpoints/best.json has no 'backbone' record; re-run `roadwork train`.")
    if "spec" not in record:
        # A bare spec (name, image_size, ...) with the fingerprint beside it.
        record = {"spec": record, "fingerprint": record.get("fingerprint") or best_json.get("fingerprint")}
    return record


def _run_backbone_weights(run: RunDir, best_json: dict[str, Any]) -> Path | None:
    """Local backbone weights file used at training time (``spec["weights"]``), or None for name-only backbones."""
    weights = _backbone_record(best_json)["spec"].get("weights")
    if not weights:
        return None
    path = Path(weights)
    if not path.is_absolute() and not path.exists() and (run.root / path).exists():
        path = run.root / path
    return path


def _build_backbone(record: dict[str, Any], weights_file: Path | None = None) -> torch.nn.Module:
    """Recreate the backbone from its spec and check its fingerprint against the recorded one."""
    from roadwork_cli.model.backbones import create_backbone

    spec = record["spec"]
    expected = record.get("fingerprint")
    try:
        backbone = create_backbone(
            spec["name"], weights=str(weights_file) if weights_file else None, image_size=spec.get("image_size")
        )
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - say which backbone could not be rebuilt and why
        raise BundleError(f"Cannot rebuild backbone {spec.get('name')!r}: {exc}") from exc
    if expected and backbone.fingerprint != expected:
        raise BundleError(
            f"Backbone {spec.get('name')!r} fingerprint mismatch: recorded {expected}, got {backbone.fingerprint}. "
            "The weights differ from those the head was trained on; pass the original --weights or re-export."
        )
    return backbone


def _head_config(record: dict[str, Any]) -> dict[str, Any]:
    head = record.get("head")
    if not isinstance(head, dict):
        raise UsageError("The checkpoint record has no 'head' config; re-run `roadwork train`.")
    return head


def _build_head(record: dict[str, Any], weights: bytes, backbone: torch.nn.Module) -> torch.nn.Module:
    from safetensors.torch import load as load_safetensors

    from roadwork_cli.model.head import SelectiveHead

    config = dict(_head_config(record))
    config.setdefault("in_dim", backbone.feature_dim)
    if int(config["in_dim"]) != int(backbone.feature_dim):
        raise BundleError(
            f"The head expects {config['in_dim']}-d features but backbone {backbone.name!r} gives "
            f"{backbone.feature_dim}."
        )
    head = SelectiveHead.from_config(config)
    try:
        state = load_safetensors(weights)
        head.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or mismatching weights are a bad bundle/run
        raise BundleError(f"Head weights do not fit the head config {config}: {exc}") from None
    return head


def _build_rule(scaling: dict[str, Any] | None, params: dict[str, Any]) -> Any:
    from roadwork_cli.calibration.rule import StageRule

    return StageRule.from_dicts(scaling, params)


def model_record(best_json: dict[str, Any], backbone: torch.nn.Module) -> dict[str, Any]:
    """The ``model.json`` record: backbone spec + fingerprint, head config, preprocessing, training provenance."""
    prep = backbone.preprocessing
    preprocessing = asdict(prep) if hasattr(prep, "__dataclass_fields__") else dict(prep)
    record = {
        "format": MODEL_FORMAT,
        "backbone": {"spec": dict(backbone.spec), "fingerprint": backbone.fingerprint},
        "head": _head_config(best_json),
        "preprocessing": preprocessing,
        "feature_dim": int(backbone.feature_dim),
    }
    for key in ("epoch", "metric", "select_metric", "value"):
        if key in best_json:
            record.setdefault("training", {})[key] = best_json[key]
    return record


# --------------------------------------------------------------------------------------------------- scores on a source
def score_source(
    run: RunDir | str | Path,
    source: str,
    settings: Settings,
    out_csv: str | Path,
    progress: bool = False,
) -> Path:
    """Run the run's model over any data source and write a raw scores CSV (``id,path,label,p_roadwork,gate``).

    Inputs that cannot be read are left out of the CSV (they have no label-free score to calibrate) and listed in
    ``<out_csv stem>.rejected.jsonl`` beside it with their reasons. The scores are the raw model outputs, the same
    kind training writes to ``scores/<split>.csv``, so ``evaluate_scores`` applies the run's calibration on top.

    Args:
        run: Trained run directory (checkpoints/best.*; calibration/* if present).
        source: Any ``--source`` accepted by ``roadwork split`` (folder, manifest, parquet, COCO, ``synthetic:N``).
        settings: Resolved settings (data section for reading the source, predict section for batching).
        out_csv: Where to write the scores CSV (atomically).
        progress: Show a progress bar on stderr.
    """
    from roadwork_cli.data.sources import SourceRejection, create_source
    from roadwork_cli.io.atomic import atomic_write_text
    from roadwork_cli.reporting.progress import progress_bar

    run = run if isinstance(run, RunDir) else RunDir(run)
    model = Stage1Model.from_run(
        run, device=settings.runtime.device, calibrated=False, precision=settings.runtime.precision
    )
    model.max_pixels = settings.data.max_image_pixels
    model.max_file_bytes = settings.data.max_file_bytes
    resolved = create_source(source, settings.data, run.synthetic)
    if resolved.prepare is not None:
        resolved.prepare(progress)
    records, rejected = [], []
    for item in resolved:
        if isinstance(item, SourceRejection):
            rejected.append({"path": item.locator, "reason": item.reason})
        else:
            records.append(item)
    locators = [r.locator for r in records]
    with progress_bar("scoring", total=len(locators), unit="img", enabled=progress) as advance:
        p_raw, g_raw, errors = model.raw_scores(
            locators, settings.predict.batch_size, settings.predict.workers, progress=advance
        )
    out = Path(out_csv)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["id", "path", "label", "p_roadwork", "gate"])
            for record, p, g, error in zip(records, p_raw, g_raw, errors, strict=True):
                if error is not None:
                    rejected.append({"path": record.locator, "reason": error})
                    continue
                # The locator identifies the input here; splits.json ids (content hashes) only exist for split data.
                writer.writerow([record.locator, record.locator, int(record.label), f"{p:.8g}", f"{g:.8g}"])
    atomic_write_text(out.with_suffix(".rejected.jsonl"), "".join(json.dumps(r) + "\n" for r in rejected))
    if not len(records) - sum(e is not None for e in errors):
        raise UsageError(f"No usable image in source {source!r} ({len(rejected)} rejected).")
    return out


# --------------------------------------------------------------------------------------------------- export
def software_versions() -> dict[str, str]:
    """Versions recorded in a bundle's manifest."""
    import platform

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for module in ("timm", "safetensors", "PIL"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is simply not recorded
            continue
    return versions


def export_bundle(run: RunDir | str | Path, out: str | Path | None = None, settings: Settings | None = None) -> Path:
    """Pack a trained, calibrated run into one verified bundle (DESIGN.md, "Artifacts").

    Members: ``manifest.json`` (written by the bundle layer), ``model_best.safetensors`` (head),
    ``backbone.safetensors`` (only when the backbone cannot be recreated from its name: a local ``--weights`` file,
    or ``export.include_backbone_weights: always``), ``model.json`` (backbone spec + fingerprint, head config,
    preprocessing), ``scrc_params.json``, ``scaling.json``, ``splits.json`` and ``metrics.csv``.

    Args:
        run: Run directory with checkpoints/best.* and calibration/*.
        out: Bundle path; default ``settings.export.out`` or ``<run>/bundle.tar``.
        settings: Resolved settings (export section); defaults when None.

    Returns:
        The bundle path, written atomically and verified after writing.
    """
    from safetensors.torch import save as save_safetensors

    from roadwork_cli.config import Settings
    from roadwork_cli.io.bundle import verify_bundle, write_bundle

    settings = settings or Settings()
    run = run if isinstance(run, RunDir) else RunDir(run)
    out = Path(out or settings.export.out or run.bundle)
    best = run.require(run.checkpoints / "best.safetensors", "train")
    best_json = read_json(run.require(run.checkpoints / "best.json", "train"))
    run.require(run.scrc_params, "calibrate")

    record = _backbone_record(best_json)
    backbone = _build_backbone(record, weights_file=_run_backbone_weights(run, best_json))
    _build_head(best_json, best.read_bytes(), backbone)  # fails here, not at deployment, if they disagree
    policy = settings.export.include_backbone_weights
    embed = policy == "always" or (policy == "auto" and bool(record["spec"].get("weights")))

    info = model_record(best_json, backbone)
    spec = dict(info["backbone"]["spec"])
    spec["weights"] = None  # a local path means nothing on another machine; the fingerprint identifies the weights
    info["backbone"] = {
        "spec": spec,
        "fingerprint": backbone.fingerprint,
        "weights_member": BACKBONE_WEIGHTS if embed else None,
    }
    members: dict[str, bytes | Path] = {
        MODEL_JSON: (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        HEAD_WEIGHTS: best,
        SCRC_PARAMS_JSON: run.scrc_params,
    }
    if embed:
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
        members[BACKBONE_WEIGHTS] = save_safetensors(state)
    for name, path in ((SCALING_JSON, run.scaling), (SPLITS_JSON, run.splits), (METRICS_CSV, run.metrics)):
        if path.exists():
            members[name] = path
    write_bundle(out, members, versions=software_versions())
    verify_bundle(out)
    return out
