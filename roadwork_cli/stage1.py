"""Stage 1 as a library: backbone + selective head + calibrated exit rule -> one decision per image.

``Stage1Model`` is what ``roadwork predict`` runs and what ``roadwork export`` packs. It is built from a run directory
(``Stage1Model.from_run``) or from a verified bundle (``load_bundle``); either way the backbone's fingerprint is
re-computed and checked against the one recorded at training time, so a head never silently runs on features it was
not trained on.

A bundle exported with ONNX (the default) also runs as an ``OnnxStage1Model``: the same graph in onnxruntime, fed by the
torch-free half of the decode path (:mod:`roadwork_cli.data.pixels`), so ``load_bundle`` and ``predict`` start
without importing torch. Both classes share :class:`ScoringModel`: the recipe, the calibrated rule and the prediction
API (``predict`` / ``iter_predict`` / ``predict_proba`` / ``raw_scores``) on top of their own ``iter_raw_scores``.
This module therefore imports torch only inside ``Stage1Model``.

Example:
    >>> from roadwork_cli import load_bundle  # doctest: +SKIP
    >>> model = load_bundle("runs/demo/bundle.tar")  # doctest: +SKIP
    >>> model.predict(["street.jpg"])[0].decision  # doctest: +SKIP
    'roadwork'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from roadwork_cli.data.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from roadwork_cli.data.pixels import DecodeRecipe, iter_pixel_batches, normalize_pixels, recipe_record
from roadwork_cli.errors import BundleError, UsageError, require_module
from roadwork_cli.io.atomic import read_json
from roadwork_cli.io.progress import progress_bar
from roadwork_cli.io.records import read_best_record, read_current
from roadwork_cli.io.run import RunDir

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from roadwork_cli.config import Settings
    from roadwork_cli.io.bundle import BundleContents
    from roadwork_cli.model.onnx_graph import OnnxGraph

# Bundle member names (docs/architecture.md, "Artifacts").
MODEL_JSON = "model.json"
HEAD_WEIGHTS = "model_best.safetensors"
BACKBONE_WEIGHTS = "backbone.safetensors"
SCALING_JSON = "scaling.json"
SCRC_PARAMS_JSON = "scrc_params.json"
SPLITS_JSON = "splits.json"
METRICS_CSV = "metrics.csv"
ONNX_GRAPH = "model.onnx"
MODEL_FORMAT = 1
RUNTIMES = ("auto", "onnx", "torch")


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


def _describe(item: Any, index: int) -> str:
    if isinstance(item, str | os.PathLike):
        return os.fspath(item)
    if isinstance(item, bytes | bytearray | memoryview):
        return f"<bytes {index}>"
    return f"<image {index}>"


class ScoringModel:
    """What the PyTorch and ONNX runtimes share: the decode recipe, the calibrated rule and the prediction API.

    Subclasses provide :meth:`iter_raw_scores`; everything that turns raw scores into ``Prediction`` records lives
    here, once.

    Args:
        rule: ``SelectiveConformal`` that calibrates raw scores and decides roadwork / no_roadwork / defer (None:
            raw scores only).
        info: Provenance (backbone spec and fingerprint, head config, recipe) as written to model.json.
        preprocessing: The backbone's input recipe.
        jpeg_draft: Draft-decode large JPEGs; ``None`` follows the recorded recipe (on when none is recorded); a
            value that differs from the recipe's is warned about.
        max_pixels: Decompression-bomb limit for inputs.
        max_file_bytes: Larger inputs are rejected unread.
    """

    runtime = "none"
    """``torch`` or ``onnx``: what computes the scores."""

    threads_per_stream = 2
    """Intra-op threads of each CPU stream under ``streams: auto`` without ``threads`` (runtime/streams.py)."""

    def __init__(
        self,
        rule: Any,
        info: dict[str, Any] | None,
        preprocessing: Any,
        jpeg_draft: bool | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ):
        self.info = dict(info or {})
        self.rule = rule
        self.preprocessing = preprocessing
        recorded_draft = (self.recorded_recipe.get("decode") or {}).get("jpeg_draft")
        if jpeg_draft is None:
            jpeg_draft = True if recorded_draft is None else bool(recorded_draft)
        elif recorded_draft is not None and bool(recorded_draft) != jpeg_draft:
            _warn_override("JPEG draft decoding", recorded_draft, jpeg_draft)
        self.jpeg_draft = jpeg_draft
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.decoder = "pil"  # the GPU decoder only where the recipe recorded it and a CUDA model runs (see below)
        self.threads: int | None = None
        """Intra-op threads per stream when ``streams`` is given (``runtime.threads``); None: cores / streams."""

    @property
    def recorded_recipe(self) -> dict[str, Any]:
        """The recipe calibration's scores were computed with (``info["recipe"]``; empty when none is recorded)."""
        recipe = self.info.get("recipe")
        return recipe if isinstance(recipe, dict) else {}

    @property
    def recipe(self) -> DecodeRecipe:
        """How this model decodes and preprocesses inputs (limits as currently set)."""
        return DecodeRecipe(self.preprocessing, self.jpeg_draft, self.max_pixels, self.max_file_bytes, self.decoder)

    def _follow_recorded_decoder(self, on_gpu: bool) -> None:
        """``data.decoder: cuda`` scores were calibrated on GPU-decoded pixels: decode so where a GPU runs the model,
        else with PIL (equal within ``CUDA_DECODE_TOLERANCE``), warning that the pixels are not the recorded ones."""
        recorded = (self.recorded_recipe.get("decode") or {}).get("decoder", "pil")
        if recorded == "cuda" and on_gpu:
            self.decoder = "cuda"
        elif recorded != "pil":
            _warn_override("JPEG decoder", recorded, "pil")

    @property
    def precision(self) -> str:
        """Compute precision tag of the forward pass (``fp32``, ``bf16``, ``fp16``)."""
        return "fp32"

    def recipe_record(self) -> dict[str, Any]:
        """The recipe as ``model.json`` records it, with this model's compute precision."""
        return recipe_record(self.recipe, self.precision)

    def _check_precision(self) -> None:
        recorded = self.recorded_recipe.get("compute_precision")
        if recorded and recorded != self.precision:
            _warn_override("compute precision", recorded, self.precision)

    # ----------------------------------------------------------------------------------------------- inference
    @property
    def default_batch_size(self) -> int:
        """Images per forward pass when none is asked for: 8 on the CPU (see ``config.CPU_BATCH_SIZE``), 32 on a GPU."""
        from roadwork_cli.config import resolve_batch_size

        return resolve_batch_size(None, self.device_type, gpu=32)

    @property
    def device_type(self) -> str:
        """Where the forward pass runs (``cpu``, ``cuda``, ...)."""
        return "cpu"

    def iter_raw_scores(
        self,
        images: Sequence[Any],
        batch_size: int | None = None,
        workers: int = 0,
        streams: int | str | None = None,
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """Raw scores batch by batch, in input order: ``(indices, p_raw, g_raw, failed)`` per batch.

        ``indices`` are the positions of the inputs scored in this batch (``p_raw``/``g_raw`` shape (B,)), and
        ``failed`` pairs each unreadable input's position with its reason. Every position of one batch is lower than
        every position of the next, so consumers can emit results as each batch finishes. ``batch_size`` None means
        :attr:`default_batch_size`. ``streams`` (a count or ``auto``; CPU only) runs batches on CPU streams
        (:mod:`roadwork_cli.runtime.streams`), each decoding its batch and then running the forward on its own
        cores; ``workers`` is then unused. None keeps decode workers beside one forward.
        """
        batch_size = batch_size or self.default_batch_size
        if streams is not None and self.device_type == "cpu":
            yield from self._stream_scores(images, batch_size, streams)
            return
        for indices, batch, failed in self.model_inputs(images, batch_size, workers):
            if batch is None:
                yield indices, np.zeros(0), np.zeros(0), failed
                continue
            p, g = self.score_batch(batch)
            yield indices, p, g, failed

    def _stream_scores(
        self, images: Sequence[Any], batch_size: int, streams: int | str
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        from roadwork_cli.runtime.streams import local_pool, ordered_map, resolve_streams

        plan = resolve_streams(streams, self.threads, per_stream=self.threads_per_stream)
        n = len(images)
        chunks = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]

        def run(chunk: list[int]) -> tuple[list[int], np.ndarray, np.ndarray, list[tuple[int, str]]]:
            # Decode phase on this stream's threads, then its forward on the same cores: never both at once.
            indices, batch, failed = self.decode_chunk(images, chunk, local_pool())
            if batch is None:
                return indices, np.zeros(0), np.zeros(0), failed
            p, g = self.score_batch(batch)
            return indices, p, g, failed

        with self.stream_context(plan) as init:
            yield from ordered_map(run, chunks, plan.streams, init=init, decode_threads=plan.threads)

    def decode_chunk(self, images: Sequence[Any], chunk: list[int], pool: Any = None) -> tuple:
        """The runtime's input for the inputs at positions ``chunk``: ``(indices, batch | None, failed)``.

        ``pool`` (a ``concurrent.futures`` executor, or None for this thread) decodes the inputs.
        """
        raise NotImplementedError

    def stream_context(self, plan: Any) -> Any:
        """A context manager giving the per-stream thread initialiser of ``plan`` (and undoing its effects)."""
        raise NotImplementedError

    def model_inputs(self, images: Sequence[Any], batch_size: int = 32, workers: int = 0) -> Iterator[tuple]:
        """The runtime's inputs batch by batch: ``(indices, batch | None, [(index, reason)])``."""
        raise NotImplementedError

    def score_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Raw (uncalibrated) p_roadwork and gate, each (B,) float64, for one batch of :meth:`model_inputs`."""
        raise NotImplementedError

    def raw_scores(
        self,
        images: Sequence[Any],
        batch_size: int | None = None,
        workers: int = 0,
        progress: bool = False,
        streams: int | str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Raw p_roadwork and gate per input (NaN where an input failed) and the failure reasons."""
        n = len(images)
        p_raw = np.full(n, np.nan)
        g_raw = np.full(n, np.nan)
        errors: list[str | None] = [None] * n
        with progress_bar("scoring", total=n, unit="img", enabled=progress) as advance:
            for indices, p, g, failed in self.iter_raw_scores(images, batch_size, workers, streams):
                for index, reason in failed:
                    errors[index] = reason
                p_raw[indices] = p
                g_raw[indices] = g
                advance(len(indices) + len(failed))
        return p_raw, g_raw, errors

    def iter_predict(
        self,
        images: Sequence[Any],
        batch_size: int | None = None,
        workers: int = 0,
        progress: bool = False,
        streams: int | str | None = None,
    ) -> Iterator[Prediction]:
        """One ``Prediction`` per input, in input order, yielded as each batch finishes.

        Unreadable inputs get ``error`` set, never an exception. Stopping the iteration early (or Ctrl-C) keeps
        everything already yielded valid: each prediction depends on its own image only.

        Args:
            images: Paths (str / Path), parquet row locators (``file.parquet#row=3``), PIL images or encoded image
                bytes.
            batch_size: Images per forward pass (None: :attr:`default_batch_size`).
            workers: Decoding workers (DataLoader processes with PyTorch, threads with ONNX; 0 = in this thread).
            progress: Show a progress bar on stderr.
            streams: CPU streams (a count or ``auto``), see :meth:`iter_raw_scores`; None: decode workers.
        """
        if isinstance(images, str | os.PathLike):
            images = [images]
        if self.rule is None:
            raise UsageError("This model has no calibration; run `roadwork calibrate` before predicting decisions.")
        with progress_bar("predicting", total=len(images), unit="img", enabled=progress) as advance:
            for indices, p_raw, g_raw, failed in self.iter_raw_scores(images, batch_size, workers, streams):
                done: dict[int, Prediction] = {
                    index: Prediction(_describe(images[index], index), None, None, None, reason)
                    for index, reason in failed
                }
                if indices:
                    p_cal, g_cal = self.rule.calibrate(p_raw, g_raw)
                    decisions = self.rule.predict(p_raw, g_raw)
                    for j, index in enumerate(indices):
                        done[index] = Prediction(
                            _describe(images[index], index), float(p_cal[j]), float(g_cal[j]), str(decisions[j])
                        )
                advance(len(done))
                yield from (done[index] for index in sorted(done))

    def predict(
        self,
        images: Sequence[Any],
        batch_size: int | None = None,
        workers: int = 0,
        progress: bool = False,
        streams: int | str | None = None,
    ) -> list[Prediction]:
        """All of :meth:`iter_predict` as a list (same arguments)."""
        return list(self.iter_predict(images, batch_size, workers, progress, streams))

    def predict_proba(self, images: Sequence[Any], batch_size: int | None = None, workers: int = 0) -> np.ndarray:
        """Calibrated P(roadwork) per input, shape (N,); NaN where an input could not be read."""
        predictions = self.predict(images, batch_size, workers)
        return np.array([np.nan if p.p_roadwork is None else p.p_roadwork for p in predictions], dtype=np.float64)


class Stage1Model(ScoringModel):
    """Backbone + selective head + calibrated exit rule, run with PyTorch.

    Inputs are decoded and preprocessed by :mod:`roadwork_cli.data.decode`, the path the feature cache uses too, so
    the scores match those calibration saw. ``recipe`` (from the cache's ``meta.json`` or the bundle's ``model.json``)
    says how calibration's features were computed: draft decoding of large JPEGs and the compute precision.

    Args:
        backbone: Feature extractor, (B, 3, H, W) -> (B, D).
        head: ``SelectiveHead``, (B, D) -> HeadOutput(cls, gate, aux) logits.
        rule: ``SelectiveConformal`` that calibrates raw scores and decides roadwork / no_roadwork / defer.
        info: Provenance (backbone spec and fingerprint, head config, recipe) as written to model.json.
        device: Where to run; default ``auto``.
        max_pixels: Decompression-bomb limit for inputs.
        max_file_bytes: Larger inputs are rejected unread.
        channels_last: Run the backbone in channels-last memory format.
        precision: ``auto`` (the recipe's precision when one is recorded, else bf16 autocast on CUDA with bf16 and
            fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``; one that differs from the recipe's is warned about.
        jpeg_draft: Draft-decode large JPEGs; ``None`` follows the recipe (on when none is recorded); a value that
            differs from the recipe's is warned about.
    """

    runtime = "torch"

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Module,
        rule: Any,
        info: dict[str, Any] | None = None,
        device: str | torch.device = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        channels_last: bool = True,
        precision: str = "auto",
        jpeg_draft: bool | None = None,
    ):
        import torch

        from roadwork_cli.runtime.device import compute_dtype, resolve_device

        super().__init__(rule, info, backbone.preprocessing, jpeg_draft, max_pixels, max_file_bytes)
        self.device = resolve_device(device) if isinstance(device, str) else device
        recorded_precision = self.recorded_recipe.get("compute_precision")
        if precision == "auto" and recorded_precision:
            precision = str(recorded_precision)
        self.compute_dtype = compute_dtype(self.device, precision)
        self._check_precision()
        self._follow_recorded_decoder(self.device.type == "cuda" and torch.cuda.is_available())
        self.backbone = backbone.eval().to(self.device)
        self.head = head.eval().to(self.device)
        self.channels_last = channels_last
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

    @property
    def precision(self) -> str:
        from roadwork_cli.runtime.device import precision_tag

        return precision_tag(self.compute_dtype)

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_run(
        cls,
        run: RunDir | str | Path,
        device: str = "auto",
        calibrated: bool = True,
        precision: str = "auto",
        jpeg_draft: bool | None = None,
    ) -> Stage1Model:
        """Build from a trained and calibrated run directory (checkpoints/best.* and calibration/*).

        Args:
            run: The run directory.
            device: Where to run.
            calibrated: Require calibration/scrc_params.json, fitted on the current scores (``load_run_calibration``);
                with ``False`` the rule is attached unchecked when present (only ``raw_scores`` needs none).
            precision: As in the class; ``auto`` follows the run's feature cache.
            jpeg_draft: As in the class; ``None`` follows the run's feature cache.
        """
        run = run if isinstance(run, RunDir) else RunDir(run)
        best = run.require(run.best_weights, "train")
        best_json = read_best_record(run).to_json()
        rule = None
        if calibrated:
            from roadwork_cli.calibration.api import load_run_calibration

            rule = load_run_calibration(run)  # refuses a calibration fitted on another model's scores
        elif run.scrc_params.exists():
            params = read_json(run.scrc_params)
            scaling = read_json(run.scaling) if run.scaling.exists() else None
            rule = _build_rule(scaling, params)
        weights = run_backbone_weights(run, best_json)
        backbone = build_backbone(backbone_record(best_json), weights_file=weights)
        head = build_head(best_json, best.read_bytes(), backbone)
        info = model_record(best_json, backbone)
        # A fine-tuned run records the recipe its scores were computed with; train_cached follows its cache's.
        cached = best_json.get("recipe") or cached_recipe(run)
        if cached is not None:
            info["recipe"] = cached
        model = cls(backbone, head, rule, info=info, device=device, precision=precision, jpeg_draft=jpeg_draft)
        model.info["recipe"] = model.recipe_record()  # what this model runs, which export records
        return model

    @classmethod
    def from_settings(cls, run: RunDir | str | Path, settings: Settings, calibrated: bool = False) -> Stage1Model:
        """``from_run`` with the settings' device, precision, decode choice and input limits (scoring a source).

        Args:
            run: The run directory.
            settings: Resolved settings (runtime and data sections).
            calibrated: As in ``from_run``; scoring raw scores needs no calibration.
        """
        model = cls.from_run(
            run,
            device=settings.runtime.device,
            calibrated=calibrated,
            precision=settings.runtime.precision,
            jpeg_draft=settings.data.jpeg_draft,
        )
        model.max_pixels = settings.data.max_image_pixels
        model.max_file_bytes = settings.data.max_file_bytes
        return model

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        device: str = "auto",
        backbone_weights: str | Path | None = None,
        precision: str = "auto",
        jpeg_draft: bool | None = None,
    ) -> Stage1Model:
        """Verify ``path`` (checksums, versions, safe member names) and build the model from it.

        Args:
            path: bundle.tar from ``roadwork export``.
            device: Where to run.
            backbone_weights: Local backbone weights for a bundle exported without them; their fingerprint must
                match the recorded one.
            precision: As in the class; ``auto`` follows the bundle's recorded recipe.
            jpeg_draft: As in the class; ``None`` follows the bundle's recorded recipe.
        """
        bundle = VerifiedBundle.read(path)
        return cls.from_verified(
            bundle, device=device, backbone_weights=backbone_weights, precision=precision, jpeg_draft=jpeg_draft
        )

    @classmethod
    def from_verified(
        cls,
        bundle: VerifiedBundle,
        device: str = "auto",
        backbone_weights: str | Path | None = None,
        precision: str = "auto",
        jpeg_draft: bool | None = None,
    ) -> Stage1Model:
        """Build from an already verified bundle (arguments as in :meth:`from_bundle`)."""
        members = bundle.contents.members
        with tempfile.TemporaryDirectory(prefix="roadwork-bundle-") as tmp:
            weights = Path(backbone_weights) if backbone_weights else None
            if weights is None and BACKBONE_WEIGHTS in members:
                weights = Path(tmp) / BACKBONE_WEIGHTS
                weights.write_bytes(members[BACKBONE_WEIGHTS])
            backbone = build_backbone(bundle.record["backbone"], weights_file=weights)
        head = build_head(bundle.record, members[HEAD_WEIGHTS], backbone)
        model = cls(
            backbone, head, bundle.rule, info=bundle.record, device=device, precision=precision, jpeg_draft=jpeg_draft
        )
        model.info["manifest"] = bundle.contents.manifest.to_dict()
        return model

    # ----------------------------------------------------------------------------------------------- inference
    @property
    def device_type(self) -> str:
        return self.device.type

    def loader(self, images: Sequence[Any], batch_size: int | None = None, workers: int = 0) -> DataLoader:
        """A DataLoader of ``(indices, (B, H, W, 3) uint8 pixels | None, [(index, reason)])`` over ``images``."""
        from roadwork_cli.data.decode import ImageDataset, create_loader

        dataset = ImageDataset(images, self.recipe)
        batch_size = batch_size or self.default_batch_size
        return create_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=self.device.type == "cuda")

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, D) float32 of (B, H, W, 3) uint8 pixels, computed as the feature cache does."""
        import torch

        from roadwork_cli.data.decode import to_model_input
        from roadwork_cli.runtime.device import autocast

        batch = to_model_input(pixels, self.preprocessing, self.device, self.channels_last)  # (B, 3, H, W)
        with torch.inference_mode(), autocast(self.device, self.compute_dtype):
            return self.backbone(batch).float()  # (B, D)

    def model_inputs(
        self, images: Sequence[Any], batch_size: int = 32, workers: int = 0
    ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
        """Decoded ``(B, H, W, 3)`` uint8 pixels batch by batch (DataLoader workers when ``workers`` > 0)."""
        yield from self.loader(images, batch_size, workers)

    def decode_chunk(self, images: Sequence[Any], chunk: list[int], pool: Any = None) -> tuple:
        """``(indices, (B, H, W, 3) uint8 pixels | None, failed)`` of the inputs at ``chunk`` (the loader's items)."""
        from roadwork_cli.data.decode import ImageDataset, collate

        dataset = ImageDataset(images, self.recipe)
        items = pool.map(dataset.__getitem__, chunk) if pool is not None else map(dataset.__getitem__, chunk)
        return collate(list(items))

    @contextlib.contextmanager
    def stream_context(self, plan: Any) -> Iterator[Any]:
        """Each stream's forward on ``plan.threads`` intra-op threads; this thread's count is restored after."""
        import torch

        before = torch.get_num_threads()
        try:
            yield plan.init_torch
        finally:
            torch.set_num_threads(before)

    def score_batch(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The PyTorch forward of one pixel batch (see :meth:`forward_raw`)."""
        return self.forward_raw(batch)

    def forward_raw(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw (uncalibrated) p_roadwork and gate, each (B,), for a batch of (B, H, W, 3) uint8 pixels."""
        import torch

        with torch.inference_mode():
            out = self.head(self.embed(pixels))
            p = torch.sigmoid(out.cls.float()).cpu().numpy()  # (B,)
            g = torch.sigmoid(out.gate.float()).cpu().numpy()  # (B,)
        return p.astype(np.float64), g.astype(np.float64)


class OnnxStage1Model(ScoringModel):
    """A bundle's ``model.onnx`` (backbone + head) in onnxruntime, with the bundle's calibrated rule; no torch.

    Decoding and preprocessing are :mod:`roadwork_cli.data.pixels` (PIL + numpy), whose network input is equal to the
    PyTorch path's; the graph computes in fp32, so a bundle calibrated on reduced-precision features is warned about
    (``load_bundle`` runs such a bundle with PyTorch unless told otherwise).

    Args:
        graph: The loaded graph.
        rule: ``SelectiveConformal`` that calibrates raw scores and decides.
        info: The bundle's model.json record (its recipe gives the preprocessing).
        jpeg_draft: As in :class:`ScoringModel`.
        max_pixels: Decompression-bomb limit for inputs.
        max_file_bytes: Larger inputs are rejected unread.
    """

    runtime = "onnx"
    threads_per_stream = 1  # a one-thread session has no intra-op pool spinning beside the stream's decode

    def __init__(
        self,
        graph: OnnxGraph,
        rule: Any,
        info: dict[str, Any],
        jpeg_draft: bool | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ):
        from roadwork_cli.data.preprocessing import Preprocessing

        recipe = info.get("recipe") if isinstance(info.get("recipe"), dict) else {}
        prep = recipe.get("preprocessing") or info.get("preprocessing")
        if not isinstance(prep, dict):
            raise BundleError("model.json records no preprocessing; re-export the bundle with `roadwork export`.")
        super().__init__(rule, info, Preprocessing.from_dict(prep), jpeg_draft, max_pixels, max_file_bytes)
        self._follow_recorded_decoder(on_gpu=False)  # the ONNX path decodes with PIL
        self.graph = graph
        self.graph_data: bytes | None = None
        """The serialised graph, from which each CPU stream opens a session of its own (None: they share one)."""
        self._sessions: dict[int, Any] = {}  # intra-op threads -> spare sessions of finished streams
        self._stream = threading.local()
        self._check_precision()

    @classmethod
    def from_bundle(
        cls, path: str | Path, jpeg_draft: bool | None = None, threads: int | None = None
    ) -> OnnxStage1Model:
        """Verify ``path`` and run its ``model.onnx`` (arguments as in :func:`load_bundle`)."""
        return cls.from_verified(VerifiedBundle.read(path), jpeg_draft=jpeg_draft, threads=threads)

    @classmethod
    def from_verified(
        cls, bundle: VerifiedBundle, jpeg_draft: bool | None = None, threads: int | None = None
    ) -> OnnxStage1Model:
        """Build from an already verified bundle that holds ``model.onnx``."""
        from roadwork_cli.model.onnx_graph import OnnxGraph

        if ONNX_GRAPH not in bundle.contents.members:
            skipped = onnx_skipped(bundle.record)
            why = f" (export left it out: {skipped})" if skipped else "; re-export it with `roadwork export`"
            raise UsageError(f"Bundle {bundle.path} has no {ONNX_GRAPH}{why}. Run it with --runtime torch.")
        graph = OnnxGraph(bundle.contents.members[ONNX_GRAPH], threads=threads)
        model = cls(graph, bundle.rule, bundle.record, jpeg_draft=jpeg_draft)
        model.graph_data = bundle.contents.members[ONNX_GRAPH]
        model.threads = threads
        model.info["manifest"] = bundle.contents.manifest.to_dict()
        return model

    def model_inputs(
        self, images: Sequence[Any], batch_size: int = 32, workers: int = 0
    ) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
        """The graph's inputs batch by batch: ``(indices, (B, 3, S, S) float32 | None, [(index, reason)])``."""
        for indices, pixels, failed in iter_pixel_batches(images, self.recipe, batch_size, workers):
            yield indices, None if pixels is None else normalize_pixels(pixels, self.preprocessing), failed

    def score_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ONNX graph on one normalised ``(B, 3, S, S)`` batch (this stream's session when streams run)."""
        graph = getattr(self._stream, "graph", None) or self.graph
        p, g = graph(batch)  # (B,), (B,)
        return p.astype(np.float64), g.astype(np.float64)

    def decode_chunk(self, images: Sequence[Any], chunk: list[int], pool: Any = None) -> tuple:
        """``(indices, normalised (B, 3, S, S) float32 | None, failed)`` of the inputs at ``chunk``."""
        from functools import partial

        from roadwork_cli.data.pixels import read_pixels, stack_pixels

        read = partial(read_pixels, recipe=self.recipe)
        items = [images[i] for i in chunk]
        results = list(pool.map(read, items) if pool is not None else map(read, items))
        indices, pixels, failed = stack_pixels(chunk, results)
        return indices, None if pixels is None else normalize_pixels(pixels, self.preprocessing), failed

    @contextlib.contextmanager
    def stream_context(self, plan: Any) -> Iterator[Any]:
        """Each stream runs its own session of ``plan.threads`` intra-op threads (kept for the next call)."""
        import queue

        from roadwork_cli.model.onnx_graph import OnnxGraph

        if self.graph_data is None:  # no bytes to open more sessions from: the streams share the one
            yield None
            return
        spare = self._sessions.setdefault(plan.threads, queue.SimpleQueue())
        taken: list[OnnxGraph] = []

        def init() -> None:
            try:
                graph = spare.get_nowait()
            except queue.Empty:
                graph = OnnxGraph(self.graph_data, threads=plan.threads)
            taken.append(graph)
            self._stream.graph = graph

        try:
            yield init
        finally:
            for graph in taken:
                spare.put(graph)


@dataclass
class VerifiedBundle:
    """A bundle read and verified in full (every member's sha256 and the manifest), with its parsed records.

    Attributes:
        path: Where it was read from.
        contents: The verified members.
        record: model.json.
        rule: The calibrated rule of scaling.json + scrc_params.json.
    """

    path: Path
    contents: BundleContents
    record: dict[str, Any]
    rule: Any

    @classmethod
    def read(cls, path: str | Path) -> VerifiedBundle:
        """Verify ``path`` (a bundle.tar, or an HF export folder) and parse its records."""
        from roadwork_cli.io.bundle import read_bundle
        from roadwork_cli.io.hf_folder import read_hf_folder

        # A folder from `roadwork export --format hf` carries the same members, checked against roadwork_meta.json.
        contents = read_hf_folder(path) if Path(path).is_dir() else read_bundle(path)
        for name in (MODEL_JSON, HEAD_WEIGHTS, SCRC_PARAMS_JSON):
            if name not in contents.members:
                raise BundleError(f"Bundle {path} has no {name!r}; re-export it with `roadwork export`.")
        record = contents.json(MODEL_JSON)
        if int(record.get("format", 1)) > MODEL_FORMAT:
            raise BundleError(
                f"Bundle {path} model.json format {record.get('format')} is newer than the supported {MODEL_FORMAT}."
            )
        scaling = contents.json(SCALING_JSON) if SCALING_JSON in contents.members else None
        rule = _build_rule(scaling, contents.json(SCRC_PARAMS_JSON))
        return cls(Path(path), contents, record, rule)

    @property
    def recorded_precision(self) -> str | None:
        recipe = self.record.get("recipe")
        return recipe.get("compute_precision") if isinstance(recipe, dict) else None


def load_bundle(
    path: str | Path,
    device: str = "auto",
    backbone_weights: str | Path | None = None,
    precision: str = "auto",
    jpeg_draft: bool | None = None,
    runtime: str = "auto",
    threads: int | None = None,
) -> ScoringModel:
    """Verify and load a bundle written by ``roadwork export``.

    ``runtime="auto"`` runs the bundle's ``model.onnx`` with onnxruntime, without importing torch, when all of these
    hold: the bundle has one, onnxruntime is installed, ``device`` is ``auto`` or ``cpu``, the precision is fp32
    (``auto`` with an fp32 recipe, or ``fp32``) and no ``backbone_weights`` are given. Otherwise it builds a
    :class:`Stage1Model` (see ``Stage1Model.from_bundle``). Either way the whole bundle is verified first.

    Args:
        path: bundle.tar from ``roadwork export``.
        device: Where to run (PyTorch).
        backbone_weights: Local backbone weights for a bundle exported without them (PyTorch).
        precision: As in :class:`Stage1Model`.
        jpeg_draft: As in :class:`ScoringModel`.
        runtime: ``auto``, ``onnx`` (fails when the bundle has no graph or onnxruntime is missing) or ``torch``.
        threads: onnxruntime intra-op threads (PyTorch's are set with ``torch.set_num_threads``).
    """
    if runtime not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)} (got {runtime!r}).")
    bundle = VerifiedBundle.read(path)
    if runtime == "auto":
        has_graph = ONNX_GRAPH in bundle.contents.members
        runtime, _ = choose_runtime(
            has_graph, bundle.recorded_precision, device, precision, backbone_weights, onnx_skipped(bundle.record)
        )
    if runtime == "onnx":
        return OnnxStage1Model.from_verified(bundle, jpeg_draft=jpeg_draft, threads=threads)
    require_module("torch")  # the inference-only install: say which extra runs this bundle
    return Stage1Model.from_verified(
        bundle, device=device, backbone_weights=backbone_weights, precision=precision, jpeg_draft=jpeg_draft
    )


def choose_runtime(
    has_graph: bool,
    recorded_precision: str | None,
    device: str = "auto",
    precision: str = "auto",
    backbone_weights: str | Path | None = None,
    skipped: str | None = None,
) -> tuple[str, str]:
    """The runtime ``load_bundle(runtime="auto")`` picks, and why in a few words (``roadwork info`` shows both).

    Args:
        has_graph: Whether the bundle holds ``model.onnx``.
        recorded_precision: The compute precision calibration's scores were computed in (``model.json``'s recipe).
        device: ``runtime.device``; the graph runs on the CPU only.
        precision: ``runtime.precision``; the graph runs in fp32 only.
        backbone_weights: Local weights given for a bundle exported without them (PyTorch only).
        skipped: Why export left the graph out (:func:`onnx_skipped`), for a bundle without one.

    Returns:
        ``("onnx" | "torch", reason)``.
    """
    if not has_graph:
        return "torch", f"export left model.onnx out: {skipped}" if skipped else "no model.onnx in the bundle"
    if device not in ("auto", "cpu"):
        return "torch", f"runtime.device is {device}; the ONNX graph runs on the CPU"
    if not (precision == "fp32" or (precision == "auto" and recorded_precision in (None, "fp32"))):
        used = recorded_precision if precision == "auto" else precision
        return "torch", f"scores are computed in {used}; the ONNX graph runs in fp32"
    if backbone_weights is not None:
        return "torch", "backbone weights were given, which only PyTorch loads"
    from roadwork_cli.model.onnx_graph import onnxruntime_available

    if not onnxruntime_available():
        return "torch", "onnxruntime is not installed: pip install onnxruntime"
    return "onnx", "model.onnx with onnxruntime, without torch"


def onnx_skipped(record: dict[str, Any]) -> str | None:
    """Why ``roadwork export`` wrote a bundle without ``model.onnx`` (its model.json ``onnx.skipped``), else None."""
    onnx = record.get("onnx")
    return str(onnx["skipped"]) if isinstance(onnx, dict) and onnx.get("skipped") else None


def _warn_override(what: str, recorded: Any, used: Any) -> None:
    warnings.warn(
        f"{what}: calibration used {recorded!r} but this model runs with {used!r}; the certified guarantee holds for "
        "scores computed the way calibration computed them, so decisions may drift from it.",
        UserWarning,
        stacklevel=3,
    )


def cached_recipe(run: RunDir) -> dict[str, Any] | None:
    """The recipe recorded in the run's current feature cache (``features/current.json`` -> ``meta.json``)."""
    current = read_current(run)
    if current is None:
        return None
    meta = run.feature_meta(current.fingerprint)
    recipe = read_json(meta).get("recipe") if meta.exists() else None
    return recipe if isinstance(recipe, dict) else None


# --------------------------------------------------------------------------------------------------- building blocks
def backbone_record(best_json: dict[str, Any]) -> dict[str, Any]:
    """The backbone part of a checkpoint record: ``{"spec": ..., "fingerprint": ...}``."""
    record = best_json.get("backbone")
    if not isinstance(record, dict):
        raise UsageError("checkpoints/best.json has no 'backbone' record; re-run `roadwork train`.")
    if "spec" not in record:
        # A bare spec (name, image_size, ...) with the fingerprint beside it.
        record = {"spec": record, "fingerprint": record.get("fingerprint") or best_json.get("fingerprint")}
    return record


def run_backbone_weights(run: RunDir, best_json: dict[str, Any]) -> Path | None:
    """Local backbone weights file used at training time (``spec["weights"]``), or None for name-only backbones."""
    weights = backbone_record(best_json)["spec"].get("weights")
    if not weights:
        return None
    path = Path(weights)
    if not path.is_absolute() and not path.exists() and (run.root / path).exists():
        path = run.root / path
    return path


def build_backbone(record: dict[str, Any], weights_file: Path | None = None) -> torch.nn.Module:
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


def build_head(record: dict[str, Any], weights: bytes, backbone: torch.nn.Module) -> torch.nn.Module:
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
    from roadwork_cli.calibration.estimator import SelectiveConformal

    return SelectiveConformal.from_dicts(scaling, params)


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
    if isinstance(best_json.get("adapters"), dict):  # fine-tuned: adapter settings + merged weights' fingerprint
        record["adapters"] = dict(best_json["adapters"])
    for key in ("epoch", "metric", "select_metric", "value"):
        if key in best_json:
            record.setdefault("training", {})[key] = best_json[key]
    return record
