"""``roadwork info BUNDLE``: what a bundle holds, read from its verified JSON members without loading the model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from roadwork_cli.cli.common import ConfigOption, DebugOption, JsonOption, console, handle_errors, print_json


def bundle_info(path: Path, device: str = "auto", precision: str = "auto", runtime: str = "auto") -> dict[str, Any]:
    """Model, thresholds, certification, targets, data counts, versions and runtime of a bundle (checksums verified).

    Args:
        path: bundle.tar from ``roadwork export``, or its ``--format hf`` folder.
        device: ``runtime.device`` that ``predict`` would run with (it decides between ONNX and PyTorch).
        precision: ``runtime.precision`` that ``predict`` would run with.
        runtime: ``predict.runtime`` (``--runtime``): ``auto`` chooses as ``load_bundle`` does; ``onnx`` or
            ``torch`` is what runs.
    """
    from roadwork_cli.calibration.estimator import is_certified
    from roadwork_cli.io.bundle import read_bundle
    from roadwork_cli.io.hf_folder import read_hf_folder
    from roadwork_cli.reporting.tables import guarantee_statement
    from roadwork_cli.stage1 import ONNX_GRAPH, choose_runtime, onnx_skipped

    # Either verifies every member's (or file's) checksum before anything is shown; a folder is an HF export.
    contents = read_hf_folder(path) if Path(path).is_dir() else read_bundle(path)
    manifest = contents.manifest
    model = contents.json("model.json") if "model.json" in contents.members else {}
    params = contents.json("scrc_params.json") if "scrc_params.json" in contents.members else {}
    splits = contents.json("splits.json") if "splits.json" in contents.members else {}
    backbone = model.get("backbone") or {}
    feasible = params.get("feasible")
    samples = splits.get("samples") or {}
    labels: dict[str, int] = {"roadwork": 0, "no_roadwork": 0}
    for sample in samples.values():
        labels["roadwork" if sample.get("label") == 1 else "no_roadwork"] += 1
    recorded_precision = (model.get("recipe") or {}).get("compute_precision")
    has_graph = ONNX_GRAPH in contents.members
    if runtime == "auto":
        runtime, reason = choose_runtime(has_graph, recorded_precision, device, precision, None, onnx_skipped(model))
    else:
        reason = f"asked for (predict.runtime / --runtime {runtime})"
    onnx = (model.get("onnx") or manifest.extras.get("onnx") or {}) if has_graph else {}
    check = onnx.get("verification") or {}
    return {
        "bundle": str(path),
        "model": {
            "backbone": (backbone.get("spec") or {}).get("name"),
            "fingerprint": backbone.get("fingerprint"),
            "feature_dim": model.get("feature_dim"),
            "head": model.get("head"),
            "preprocessing": model.get("preprocessing"),
            "precision": (model.get("recipe") or {}).get("compute_precision") or model.get("precision"),
            "decode": (model.get("recipe") or {}).get("decode"),
            "adapters": model.get("adapters"),
            "training": model.get("training"),
        },
        "guarantee": guarantee_statement(params),
        "onnx": None
        if not has_graph
        else {
            "max_abs_diff": check.get("max_abs_diff"),
            "tolerance": check.get("tolerance"),
            "samples": check.get("samples"),
            "test_split_images": check.get("test_split_images"),
        },
        "predict_runtime": {"runtime": runtime, "reason": reason, "device": device, "precision": precision},
        "calibration": {
            "method": params.get("method"),
            "thresholds": params.get("thresholds"),
            "gate_score": params.get("gate_score"),
            "feasible": feasible,
            "certified": feasible is not None and is_certified(params),
            "targets": params.get("targets"),
            "certified_bounds": params.get("certified"),
            "calibration_images": params.get("n"),
            "calibration_positives": params.get("n_pos"),
            "unit": params.get("unit") or "images",
            "calibration_groups": params.get("n_groups"),
            "largest_group": params.get("largest_group"),
        },
        "data": {
            "images": len(samples),
            "labels": labels,
            "splits": {name: len(ids) for name, ids in (splits.get("splits") or {}).items()},
        },
        "versions": {"bundle_format": manifest.format_version, "roadwork": manifest.roadwork_version}
        | dict(manifest.versions),
        "created": manifest.created,
        "members": {name: entry.size for name, entry in sorted(manifest.members.items())},
    }


@handle_errors
def command(
    bundle: Annotated[Path, typer.Argument(help="bundle.tar from `roadwork export`, or its --format hf folder.")],
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Show what a bundle holds: model, thresholds, certification, targets, data counts, versions, predict's runtime.

    The settings (``--config``, ``ROADWORK_*``) matter for the runtime: ``predict.runtime``, ``runtime.device`` and
    ``runtime.precision`` decide, as in ``predict``, whether the bundle's ONNX graph or PyTorch runs it.
    """
    from roadwork_cli.cli.common import resolve_settings

    settings = resolve_settings(config, {"runtime": {"debug": debug or None}}, write_to_run=False)
    info = bundle_info(bundle, settings.runtime.device, settings.runtime.precision, settings.predict.runtime)
    if json_output:
        print_json(info)
        return
    console.print(info_table(info))


def info_table(info: dict[str, Any]):
    """A two-column rich table of ``bundle_info``."""
    from rich.markup import escape
    from rich.table import Table

    model, cal, data = info["model"], info["calibration"], info["data"]
    thresholds = {k: v for k, v in (cal["thresholds"] or {}).items() if v is not None}
    targets = cal["targets"] or {}
    guarantee = info["guarantee"] or "not recorded"
    if not cal["certified"]:
        guarantee = f"[yellow]{guarantee}[/]"
    rows = [
        ("backbone", f"{model['backbone']} ({model['fingerprint']})"),
        ("feature dim", str(model["feature_dim"])),
        ("precision / decode", f"{model['precision'] or '-'}; " + _pairs(model["decode"] or {})),
        ("head", _pairs(model["head"] or {})),
        ("calibration", f"{cal['method'] or '-'}, selection score {cal['gate_score'] or '-'}"),
        (
            "thresholds",
            ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in thresholds.items()),
        ),
        ("guarantee", guarantee),
        ("predict runtime", escape(runtime_line(info))),  # "roadwork-cli[onnx]" is not markup
        ("targets", ", ".join(f"{k}={v}" for k, v in targets.items() if k in ("alpha", "delta", "xi"))),
        (
            "calibration images",
            "-"
            if cal["calibration_images"] is None
            else f"{cal['calibration_images']} ({cal['calibration_positives']} roadwork)",
        ),
        (
            "data",
            f"{data['images']} images ({data['labels']['roadwork']} roadwork, {data['labels']['no_roadwork']} "
            "no_roadwork); " + ", ".join(f"{k} {v}" for k, v in data["splits"].items()),
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())),
        ("created", str(info["created"])),
        ("members", ", ".join(info["members"])),
    ]
    table = Table(title=f"bundle {info['bundle']}", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    return table


def runtime_line(info: dict[str, Any]) -> str:
    """``onnx (model.onnx verified at export, max |Δp| 3e-07)`` or ``torch (no model.onnx in the bundle)``."""
    chosen, onnx = info["predict_runtime"], info["onnx"]
    if chosen["runtime"] == "onnx":
        reason = "model.onnx verified at export"
    else:
        reason = chosen["reason"]
    if onnx is not None:
        diff = onnx.get("max_abs_diff")
        verified = "not recorded" if diff is None else f"{diff:.2g}"
        reason += f", max |Δp| {verified}" if chosen["runtime"] == "onnx" else f"; model.onnx max |Δp| {verified}"
        if onnx.get("samples") is not None:
            reason += f" on {onnx['samples']} inputs"
    return f"{chosen['runtime']} ({reason})"


def _pairs(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in mapping.items()) or "-"
