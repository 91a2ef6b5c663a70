"""Export: pack a trained, calibrated run into one verified, self-describing bundle (docs/architecture.md, "Artifacts").

Members: ``manifest.json`` (written by the bundle layer), ``model_best.safetensors`` (head), ``backbone.safetensors``
(only when the backbone cannot be recreated from its name: a local ``--weights`` file, or
``export.include_backbone_weights: always``), ``model.json`` (backbone spec + fingerprint, head config, the decode and
preprocessing recipe with the compute precision that calibration's scores were computed with), ``scrc_params.json``,
``scaling.json``, ``splits.json`` (sample paths made portable) and ``metrics.csv``.

Example:
    >>> export_bundle("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/bundle.tar')
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import read_json
from roadwork_cli.io.run import RunDir
from roadwork_cli.stage1 import (
    BACKBONE_WEIGHTS,
    HEAD_WEIGHTS,
    METRICS_CSV,
    MODEL_JSON,
    SCALING_JSON,
    SCRC_PARAMS_JSON,
    SPLITS_JSON,
    Stage1Model,
)

if TYPE_CHECKING:
    from roadwork_cli.config import Settings

__all__ = ["UncertifiedExportWarning", "export_bundle", "portable_splits", "software_versions"]


class UncertifiedExportWarning(UserWarning):
    """A bundle is being exported from a calibration that did not certify its targets."""


def software_versions() -> dict[str, str]:
    """Versions recorded in a bundle's manifest."""
    import platform

    versions = {"python": platform.python_version()}
    for module in ("torch", "numpy", "timm", "safetensors", "PIL"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is simply not recorded
            continue
    return versions


def _portable_path(path: str, bases: list[Path]) -> str | None:
    """``path`` relative to the first base that holds it; ``None`` when it is absolute and under none of them.

    A parquet row locator (``/data/x.parquet#row=3``) keeps its ``#...`` suffix on the relative file part.
    """
    file, hash_mark, fragment = path.partition("#")
    if not PurePosixPath(file).is_absolute() and not Path(file).is_absolute():
        return path
    for base in bases:
        try:
            relative = Path(file).relative_to(base)
        except ValueError:
            continue
        return relative.as_posix() + hash_mark + fragment
    return None


def portable_splits(splits: dict[str, Any], run_root: Path) -> dict[str, Any]:
    """A copy of a ``splits.json`` document with no absolute path of the machine that wrote it.

    Sample paths become relative to the run directory (synthetic images), else to their source (a source folder, or
    a manifest's / parquet file's folder); a path under neither is dropped (``null``): the content hash (the id) still
    identifies the image. Absolute source specs keep only their last component.
    """
    document = json.loads(json.dumps(splits))
    root = Path(run_root).resolve()
    for sample in (document.get("samples") or {}).values():
        source = str(sample.get("source") or "")
        bases = [root]
        if source and Path(source).is_absolute():
            spec = Path(source)
            bases += [spec, spec.parent]
            sample["source"] = spec.name
        path = sample.get("path")
        if isinstance(path, str):
            sample["path"] = _portable_path(path, bases)
    return document


def _check_certified(params: dict[str, Any], allow_uncertified: bool) -> None:
    """Refuse a calibration that did not certify its targets unless allowed, and then warn."""
    if params.get("feasible", True) is not False:
        return
    if not allow_uncertified:
        raise UsageError(
            "This run's calibration did not certify its targets (feasible: false, from `calibrate "
            "--allow-infeasible`), so a bundle from it carries no guarantee. Re-calibrate with attainable targets or "
            "more calibration data, or export anyway with --allow-uncertified (export.allow_uncertified: true)."
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
    """
    from safetensors.torch import save as save_safetensors

    from roadwork_cli.config import Settings
    from roadwork_cli.io.bundle import verify_bundle, write_bundle
    from roadwork_cli.io.provenance import check

    settings = settings or Settings()
    run = run if isinstance(run, RunDir) else RunDir(run)
    out = Path(out or settings.export.out or run.bundle)
    best = run.require(run.checkpoints / "best.safetensors", "train")
    params = read_json(run.require(run.scrc_params, "calibrate"))
    check(run, "calibrate", "calibrate")
    _check_certified(params, settings.export.allow_uncertified)

    # Building the model checks here, not at deployment, that backbone, head and rule fit together.
    model = Stage1Model.from_run(run, device="cpu")
    info = {k: v for k, v in model.info.items() if k != "manifest"}
    spec = dict(info["backbone"]["spec"])
    policy = settings.export.include_backbone_weights
    embed = policy == "always" or (policy == "auto" and bool(spec.get("weights")))
    spec["weights"] = None  # a local path means nothing on another machine; the fingerprint identifies the weights
    info["backbone"] = {
        "spec": spec,
        "fingerprint": model.backbone.fingerprint,
        "weights_member": BACKBONE_WEIGHTS if embed else None,
    }
    members: dict[str, bytes | Path] = {
        MODEL_JSON: (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        HEAD_WEIGHTS: best,
        SCRC_PARAMS_JSON: run.scrc_params,
    }
    if embed:
        state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.model.state_dict().items()}
        members[BACKBONE_WEIGHTS] = save_safetensors(state)
    if run.splits.exists():
        splits = portable_splits(read_json(run.splits), run.root)
        members[SPLITS_JSON] = (json.dumps(splits, indent=2, sort_keys=True) + "\n").encode("utf-8")
    for name, path in ((SCALING_JSON, run.scaling), (METRICS_CSV, run.metrics)):
        if path.exists():
            members[name] = path
    write_bundle(out, members, versions=software_versions())
    verify_bundle(out)
    return out
