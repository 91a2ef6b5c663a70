"""Export: pack a trained, calibrated run into one verified, self-describing bundle (docs/architecture.md, "Artifacts").

Members: ``manifest.json`` (written by the bundle layer), ``model_best.safetensors`` (head), ``backbone.safetensors``
(only when the backbone cannot be recreated from its name: a local ``--weights`` file, or
``export.include_backbone_weights: always``), ``model.json`` (backbone spec + fingerprint, head config, the decode and
preprocessing recipe with the compute precision that calibration's scores were computed with), ``scrc_params.json``,
``scaling.json``, ``splits.json`` (sample paths made portable) and ``metrics.csv``; with ``export.onnx`` (the
default; ``--no-onnx`` turns it off) also ``model.onnx``: backbone + head in one graph (input ``pixels``, the
normalised ``(B, 3, S, S)`` float32 batch; outputs ``p_roadwork_raw`` and ``gate_raw``, the raw sigmoid scores),
verified against the PyTorch forward on sample inputs before it is packed. Its verification (max abs diff, tolerance,
samples) goes into ``model.json`` under ``onnx`` and into the manifest's ``extras``. A backbone whose graph cannot be
exported or does not verify leaves ``model.onnx`` out: ``onnx`` then records ``{"member": null, "skipped": REASON}``,
an :class:`OnnxSkippedWarning` says so, and the bundle runs with PyTorch.

Example:
    >>> export_bundle("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/bundle.tar')
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from roadwork_cli.errors import RoadworkError, UsageError
from roadwork_cli.io.atomic import read_json
from roadwork_cli.io.run import RunDir
from roadwork_cli.stage1 import (
    BACKBONE_WEIGHTS,
    HEAD_WEIGHTS,
    METRICS_CSV,
    MODEL_JSON,
    ONNX_GRAPH,
    SCALING_JSON,
    SCRC_PARAMS_JSON,
    SPLITS_JSON,
    Stage1Model,
)

if TYPE_CHECKING:
    from roadwork_cli.config import Settings

__all__ = [
    "ONNX_TOLERANCE",
    "OnnxSkippedWarning",
    "UncertifiedExportWarning",
    "export_bundle",
    "export_onnx",
    "onnx_backbone_session",
    "portable_splits",
    "software_versions",
]

ONNX_TOLERANCE = 1e-4
"""Largest max abs difference of the raw scores (probabilities) between the ONNX graph and PyTorch at export."""

ONNX_SAMPLES = 4
"""Inputs the ONNX graph is verified on: test-split images when the run has them, seeded random tensors otherwise."""


class UncertifiedExportWarning(UserWarning):
    """A bundle is being exported from a calibration that did not certify its targets."""


class OnnxSkippedWarning(UserWarning):
    """A bundle is being written without ``model.onnx``: its graph could not be exported or did not verify."""


def software_versions(onnx: bool = False) -> dict[str, str]:
    """Versions recorded in a bundle's manifest (with onnxruntime's when the bundle has an ONNX graph)."""
    import platform

    versions = {"python": platform.python_version()}
    for module in ("torch", "numpy", "timm", "safetensors", "PIL", *(("onnxruntime",) if onnx else ())):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is simply not recorded
            continue
    return versions


MAX_LEVELS_UP = 2
"""How far above its source's folder a sample may lie and still be recorded relative to it (``../images/a.jpg``)."""

_FILE_SOURCES = (".csv", ".jsonl", ".json", ".parquet")
"""Suffixes of file sources (manifests, COCO json, one parquet file): their paths are relative to the file's folder."""


def _absolute_forms(path: str) -> list[Path]:
    """``path`` as written and with its links resolved (a run under a linked folder records either form)."""
    plain = Path(path)
    forms = [plain]
    try:
        resolved = plain.resolve()
    except (OSError, RuntimeError):
        return forms
    return forms if resolved == plain else [*forms, resolved]


def _relative_to(file: str, base: Path, up: int) -> str | None:
    """``file`` relative to ``base`` in POSIX form, climbing at most ``up`` folders; None beyond that."""
    for form in _absolute_forms(file):
        for anchor in _absolute_forms(str(base)):
            try:
                relative = PurePosixPath(Path(os.path.relpath(form, anchor)).as_posix())
            except ValueError:  # another drive
                continue
            climbs = relative.parts.count("..")
            if climbs <= up and all(part == ".." for part in relative.parts[:climbs]):
                return relative.as_posix()
    return None


def _portable_path(path: str, bases: list[tuple[Path, int]]) -> str | None:
    """``path`` relative to the first ``(base, levels up allowed)`` that can hold it; ``None`` when none can.

    A relative path is kept. A parquet row locator (``/data/x.parquet#row=3``) keeps its ``#...`` suffix on the
    relative file part.
    """
    file, hash_mark, fragment = path.partition("#")
    if not PurePosixPath(file).is_absolute() and not Path(file).is_absolute():
        return path
    for base, up in bases:
        relative = _relative_to(file, base, up)
        if relative is not None:
            return relative + hash_mark + fragment
    return None


def _source_folder(source: str) -> Path | None:
    """The folder a sample's path is recorded relative to: a folder source itself, a file source's folder.

    None for a source that names no absolute location (``synthetic:N``, or a relative spec in a splits.json written
    before ``split`` recorded sources absolutely).
    """
    spec = Path(source)
    if not source or not spec.is_absolute():
        return None
    return spec.parent if spec.suffix.lower() in _FILE_SOURCES and not spec.is_dir() else spec


def portable_splits(splits: dict[str, Any], run_root: Path) -> dict[str, Any]:
    """A copy of a ``splits.json`` document with no path of the machine that wrote it.

    Sample paths become relative to the run directory (synthetic images), else to their source's folder (a class
    folder or parquet folder itself; a manifest's, parquet file's or COCO file's folder), up to
    :data:`MAX_LEVELS_UP` folders above it (``../images/a.jpg`` for a COCO file in ``annotations/``, as manifests
    write them). A path under none of these is dropped (``null``): the content hash (the id) still identifies the
    image. Absolute source specs keep only their last component; a group that is a path (``data.group_by:
    filename``) is made relative the same way, or else replaced by a hash of it (members of a group keep one value).
    """
    document = json.loads(json.dumps(splits))
    root = Path(os.path.abspath(run_root))
    for sample in (document.get("samples") or {}).values():
        source = str(sample.get("source") or "")
        bases = [(root, 0)]
        folder = _source_folder(source)
        if folder is not None:
            bases.append((folder, MAX_LEVELS_UP))
            sample["source"] = Path(source).name
        path = sample.get("path")
        if isinstance(path, str):
            sample["path"] = _portable_path(path, bases)
        group = sample.get("group")
        if isinstance(group, str) and (PurePosixPath(group).is_absolute() or Path(group).is_absolute()):
            portable = _portable_path(group, bases)
            sample["group"] = portable or "sha256:" + hashlib.sha256(group.encode("utf-8")).hexdigest()[:16]
    return document


def _how_uncertified(params: dict[str, Any]) -> str:
    """What happened at calibrate, from what scrc_params.json records (files before ``allow_infeasible`` say less)."""
    allowed = params.get("allow_infeasible")
    if allowed is True:
        return "`roadwork calibrate --allow-infeasible` wrote thresholds that are not certified (feasible: false)"
    if allowed is False:
        return ("`roadwork calibrate` found the targets not attainable, exited 3 and wrote its parameters with "
                "feasible: false")  # fmt: skip
    return "its parameters say feasible: false"


def _check_certified(params: dict[str, Any], allow_uncertified: bool) -> None:
    """Refuse a calibration that did not certify its targets unless allowed, and then warn."""
    if params.get("feasible", True) is not False:
        return
    if not allow_uncertified:
        raise UsageError(
            f"This run's calibration did not certify its targets: {_how_uncertified(params)}, so a bundle from it "
            "carries no guarantee. Re-calibrate with attainable targets or more calibration data, or export anyway "
            "with --allow-uncertified (export.allow_uncertified: true)."
        )
    warnings.warn(
        "Exporting an uncertified calibration (feasible: false): the bundle's decisions carry no guarantee.",
        UncertifiedExportWarning,
        stacklevel=3,
    )


def export_bundle(run: RunDir | str | Path, out: str | Path | None = None, settings: Settings | None = None) -> Path:
    """Pack a trained, calibrated run into one verified bundle (members in the module docstring).

    Args:
        run: Run directory with checkpoints/best.* and calibration/*.
        out: Bundle path; default ``settings.export.out`` or ``<run>/bundle.tar``.
        settings: Resolved settings (export section); defaults when None.

    Returns:
        The bundle path, written atomically and verified after writing.

    Raises:
        StaleError: The calibration was made from inputs that changed since.
        UsageError: The calibration is uncertified and ``export.allow_uncertified`` is off.

    Warns:
        OnnxSkippedWarning: ``export.onnx`` is on but the graph cannot be exported, does not verify within
            ``ONNX_TOLERANCE``, or onnxruntime is missing to verify it; the bundle is written without it.
    """
    from safetensors.torch import save as save_safetensors

    from roadwork_cli.config import Settings
    from roadwork_cli.io.bundle import verify_bundle, write_bundle

    settings = settings or Settings()
    run = run if isinstance(run, RunDir) else RunDir(run)
    out = Path(out or settings.export.out or run.bundle)
    best = run.require(run.best_weights, "train")
    # Building the model checks here, not at deployment, that backbone, head and rule fit together, and that the
    # calibration was fitted on this model's scores (Stage1Model.from_run loads it with load_run_calibration).
    model = Stage1Model.from_run(run, device="cpu")
    _check_certified(model.rule.params, settings.export.allow_uncertified)
    info = {k: v for k, v in model.info.items() if k != "manifest"}
    spec = dict(info["backbone"]["spec"])
    policy = settings.export.include_backbone_weights
    # Merged adapters exist nowhere else: their weights always travel in the bundle.
    embed = policy == "always" or (policy == "auto" and bool(spec.get("weights"))) or "adapters" in info
    spec["weights"] = None  # a local path means nothing on another machine; the fingerprint identifies the weights
    info["backbone"] = {
        "spec": spec,
        "fingerprint": model.backbone.fingerprint,
        "weights_member": BACKBONE_WEIGHTS if embed else None,
    }
    members: dict[str, bytes | Path] = {HEAD_WEIGHTS: best, SCRC_PARAMS_JSON: run.scrc_params}
    extras: dict[str, Any] = {}
    graph = None
    if settings.export.onnx:
        graph, info["onnx"] = _try_export_onnx(model, run)
        extras["onnx"] = info["onnx"]
    if graph is not None:
        members[ONNX_GRAPH] = graph
    members[MODEL_JSON] = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")
    if embed:
        state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.model.state_dict().items()}
        members[BACKBONE_WEIGHTS] = save_safetensors(state)
    if run.splits.exists():
        splits = portable_splits(read_json(run.splits), run.root)
        members[SPLITS_JSON] = (json.dumps(splits, indent=2, sort_keys=True) + "\n").encode("utf-8")
    for name, path in ((SCALING_JSON, run.scaling), (METRICS_CSV, run.metrics)):
        if path.exists():
            members[name] = path
    write_bundle(out, members, versions=software_versions(onnx=graph is not None), extras=extras)
    verify_bundle(out)
    return out


def _try_export_onnx(model: Stage1Model, run: RunDir) -> tuple[bytes | None, dict[str, Any]]:
    """:func:`export_onnx`, or ``(None, {"member": None, "skipped": reason})`` with a warning when it cannot be done.

    An export the exporter cannot express, one that does not verify, or a machine without onnx/onnxruntime is no
    reason to refuse the bundle: it runs with PyTorch, and the manifest says why it has no graph.
    """
    try:
        return export_onnx(model, run)
    except (RoadworkError, ImportError) as exc:
        reason = str(exc) if isinstance(exc, RoadworkError) else f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"The bundle is written without model.onnx, so predict and serve run it with PyTorch: {reason}",
        OnnxSkippedWarning,
        stacklevel=3,
    )
    return None, {"member": None, "skipped": reason}


def export_onnx(model: Stage1Model, run: RunDir | None = None, tolerance: float = ONNX_TOLERANCE) -> tuple[bytes, dict]:
    """The model's backbone + head as one ONNX graph, verified against its PyTorch forward.

    The graph and the fp32 PyTorch module it was exported from score the same inputs: up to ``ONNX_SAMPLES``
    test-split images of ``run`` decoded as predict decodes them (seeded random inputs make up the rest), as one
    batch and again as a batch of one (the batch axis is dynamic).

    Args:
        model: A model on the CPU.
        run: The run whose test split gives the sample images; None: seeded random inputs only.
        tolerance: Largest allowed max abs difference of the raw scores.

    Returns:
        The serialised graph and its ``onnx`` record (member, opset, input/outputs, compute precision, and
        ``verification``: max_abs_diff, tolerance, samples from the test split and random).

    Raises:
        UsageError: onnxruntime is not installed (it is needed to verify the graph).
        RoadworkError: The export fails, or a difference exceeds ``tolerance``.
    """
    import numpy as np
    import torch

    from roadwork_cli.model.onnx_graph import (
        INPUT_NAME,
        OPSET,
        OUTPUT_NAMES,
        OnnxGraph,
        export_scores_graph,
        onnxruntime_available,
        scores_module,
    )

    if not onnxruntime_available():
        raise UsageError(
            "export verifies model.onnx with onnxruntime, which is not installed: pip install onnxruntime, or "
            "export with --no-onnx."
        )
    size = int(model.preprocessing.size)
    data = export_scores_graph(model.backbone, model.head, size)
    batch, from_split = _verification_batch(model, run, ONNX_SAMPLES)  # (N, 3, S, S)
    with torch.inference_mode():
        expected = [t.numpy() for t in scores_module(model.backbone, model.head)(batch)]  # 2 x (N,)
    graph = OnnxGraph(data)
    whole = graph(batch.numpy())
    single = graph(batch[:1].numpy())
    diffs = [np.abs(got - want).max() for got, want in zip(whole, expected, strict=True)]
    diffs += [np.abs(got - want[:1]).max() for got, want in zip(single, expected, strict=True)]
    max_diff = float(max(diffs))
    if not np.isfinite(max_diff) or max_diff > tolerance:
        raise RoadworkError(
            f"The ONNX graph of backbone {model.backbone.name!r} does not reproduce PyTorch: its raw scores differ by "
            f"up to {max_diff:.3g} (tolerance {tolerance:g}) on {len(batch)} sample inputs."
        )
    return data, {
        "member": ONNX_GRAPH,
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "outputs": list(OUTPUT_NAMES),
        "compute_precision": "fp32",
        "verification": {
            "max_abs_diff": max_diff,
            "tolerance": tolerance,
            "samples": len(batch),
            "test_split_images": from_split,
            "seeded_random_inputs": len(batch) - from_split,
        },
    }


def _verification_batch(model: Stage1Model, run: RunDir | None, n: int) -> tuple[Any, int]:
    """``((n, 3, S, S) float32 inputs, how many are test-split images)``; seeded random inputs fill the rest."""
    import torch

    from roadwork_cli.data.decode import to_model_input

    size = int(model.preprocessing.size)
    locators: list[str] = []
    if run is not None and run.splits.exists():
        document = read_json(run.splits)
        samples = document.get("samples") or {}
        for image_id in (document.get("splits") or {}).get("test", [])[: 2 * n]:  # spares for unreadable ones
            path = str((samples.get(image_id) or {}).get("path") or "")
            file = Path(path.partition("#")[0])
            if path and not file.is_absolute() and not file.exists() and (run.root / file).exists():
                path = str(run.root / path)
            if path:
                locators.append(path)
    parts = []
    for _, pixels, _ in model.loader(locators):
        if pixels is not None:
            parts.append(to_model_input(pixels[:n], model.preprocessing, torch.device("cpu"), channels_last=False))
    real = torch.cat(parts)[:n] if parts else torch.zeros(0, 3, size, size)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(n - len(real), 3, size, size, generator=generator)  # roughly the normalised pixel scale
    return torch.cat([real, noise]).contiguous(), len(real)


def onnx_backbone_session(backbone_name: str) -> tuple[Any, int]:
    """An onnxruntime session of a registry backbone alone (input ``pixels``, output ``features``) and its input side.

    For benchmarks: the bare forward of the ONNX runtime beside the eager one, on the same (B, 3, S, S) tensors.
    """
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.onnx_graph import create_session, export_graph

    backbone = create_backbone(backbone_name).eval()
    size = int(backbone.preprocessing.size)
    data = export_graph(backbone, size, ("features",), backbone_name)
    return create_session(data), size
