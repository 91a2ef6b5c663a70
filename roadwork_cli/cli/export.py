"""``roadwork export``: one verified, self-describing bundle."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from roadwork_cli.cli.common import (
    ConfigOption,
    DebugOption,
    JsonOption,
    RunOption,
    console,
    handle_errors,
    print_json,
    require_run,
    setting_default,
)


@handle_errors
def command(
    run: RunOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Bundle path (default DIR/bundle.tar); with --format hf the folder (default DIR/hf)."
        ),
    ] = None,
    allow_uncertified: Annotated[
        bool | None,
        typer.Option(
            "--allow-uncertified",
            help="Export even when calibration did not certify its targets (feasible: false); warns.",
            show_default=False,
        ),
    ] = None,
    onnx: Annotated[
        bool | None,
        typer.Option(
            "--onnx/--no-onnx",
            help="Write model.onnx (backbone + head in one graph) into the bundle, checked against PyTorch before "
            "packing; predict, serve and the NATIX detector then run it with onnxruntime, without torch, on the CPU "
            "(`roadwork info BUNDLE` says which runtime predict will use, and why). A graph that cannot be exported "
            "or whose raw scores differ from PyTorch's by more than 1e-4 is left out with a warning, and the reason "
            "goes into the manifest. --no-onnx leaves it out.",
            show_default=setting_default("export.onnx", "true"),
        ),
    ] = None,
    natix: Annotated[
        Path | None,
        typer.Option(
            "--natix",
            help="Also write a NATIX StreetVision miner here: detector module (ROADWORK_STAGE1), its YAML, "
            "model_card.json, README, and the remap of p placed on val_select's challenge levels.",
        ),
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="bundle: bundle.tar. hf: a folder (--out, default DIR/hf) that transformers loads as it is "
            "(TimmWrapper layout: pipeline('image-classification') scores the calibrated p as label Roadwork), with "
            "roadwork_meta.json (thresholds, certificate, checksums) so `roadwork predict --bundle FOLDER` decides as "
            "the bundle does. Needs a timm backbone and a linear cls logit (head.cls: linear).",
        ),
    ] = "bundle",
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels", help="--format hf: names of class 0 and class 1, comma-separated (default None,Roadwork)."
        ),
    ] = None,
    json_output: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Pack model, calibration and provenance into bundle.tar (or, with --format hf, a transformers folder)."""
    from roadwork_cli.cli.common import resolve_settings
    from roadwork_cli.io.run import RunDir

    overrides: dict = {"runtime": {"run": run}}
    if out is not None:  # a nested None would be validated as a value rather than skipped
        overrides["export"] = {"out": out}
    if allow_uncertified:
        overrides.setdefault("export", {})["allow_uncertified"] = True
    if onnx is not None:
        overrides.setdefault("export", {})["onnx"] = onnx
    _check_format(export_format, natix)
    if export_format == "hf":
        overrides.pop("export", None)  # --out names the folder here, not export.out's bundle path
        if allow_uncertified:
            overrides["export"] = {"allow_uncertified": True}
    settings = resolve_settings(config, overrides)
    run_dir = RunDir(require_run(settings))
    if export_format == "hf":
        _export_hf(run_dir, out, settings, labels, json_output)
        return

    from roadwork_cli.export import OnnxSkippedWarning, UncertifiedExportWarning, export_bundle  # torch inside
    from roadwork_cli.io.bundle import verify_bundle

    with warnings.catch_warnings():  # rendered as one line by common.render_warning
        warnings.simplefilter("always", UncertifiedExportWarning)  # every export says it, not only a process's first
        warnings.simplefilter("always", OnnxSkippedWarning)
        path = export_bundle(run_dir, settings.export.out, settings)
    manifest = verify_bundle(path)
    console.print(bundle_table(path, manifest))
    line = onnx_line(manifest.extras.get("onnx"))
    if line:
        console.print(line, soft_wrap=True)
    console.print(f"bundle: {path}  (try: roadwork predict IMAGE --bundle {path})")
    miner = None
    if natix is not None:
        from roadwork_cli.natix import write_natix_miner

        miner = write_natix_miner(run_dir, natix, settings, bundle=path, progress=console.is_terminal)
        console.print(natix_line(miner), soft_wrap=True)
    if json_output:
        print_json({"bundle": path} | manifest.to_dict() | ({"natix": miner} if miner else {}))


def _check_format(export_format: str, natix: Path | None) -> None:
    from roadwork_cli.errors import UsageError

    if export_format not in ("bundle", "hf"):
        raise UsageError(f"--format must be bundle or hf (got {export_format!r}).")
    if export_format == "hf" and natix is not None:
        raise UsageError("--natix ships a bundle.tar; run `roadwork export --natix DIR` and `--format hf` separately.")


def _export_hf(run_dir, out: Path | None, settings, labels: str | None, json_output: bool) -> None:
    from roadwork_cli.hf_export import export_hf, parse_labels  # heavy (torch, transformers) import inside

    summary = export_hf(run_dir, out, settings, labels=parse_labels(labels))
    check = summary["verification"]
    console.print(
        f"hf folder: {summary['out']} ({summary['architecture']}, labels {', '.join(summary['labels'])}); "
        f"transformers' p({summary['labels'][1]}) checked against roadwork's on {check['samples']} inputs: max abs "
        f"diff {check['max_abs_diff']:.2g} (tolerance {check['tolerance']:g}). Decisions (defer) need "
        f"roadwork_meta.json's thresholds: roadwork predict IMAGE --bundle {summary['out']}",
        soft_wrap=True,
    )
    if json_output:
        print_json(summary)


def natix_line(miner: dict) -> str:
    """Where the NATIX miner went, its registry name and its remap, in one paragraph."""
    everything = miner["measured"].get("all_levels") or {}
    return (
        f"NATIX miner: {miner['out_dir']} (detector {miner['registry_name']}; README.md there has the steps). "
        f"Remap: p >= {miner['threshold']:.4f} answers > 0.5; val_select under the challenge mix: reward "
        f"{everything.get('reward_plain_p', float('nan')):.4f} for round(p), "
        f"{everything.get('reward_remapped', float('nan')):.4f} after the remap (in-sample)"
        + _held_out(miner["measured"].get("held_out"))
        + "."
    )


def _held_out(block: dict | None) -> str:
    if not block or "all_levels" not in block:
        return ""
    everything = block["all_levels"]
    return (
        f"; held-out {block['split']}: {everything['reward_plain_p']:.4f} for round(p), "
        f"{everything['reward_remapped']:.4f} after the remap"
    )


def bundle_table(path: Path, manifest):
    """A rich table of a bundle's members with sizes and checksums."""
    from rich.table import Table

    table = Table(title=f"bundle {path} (format {manifest.format_version}, roadwork {manifest.roadwork_version})")
    table.add_column("member")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for name, entry in sorted(manifest.members.items()):
        table.add_row(name, f"{entry.size:,}", entry.sha256[:16] + "…")
    return table


def onnx_line(record: dict | None) -> str | None:
    """How the bundle's ONNX graph was verified at export, in one line (None without one; a skip was warned about)."""
    if not record or not record.get("member"):
        return None
    check = record.get("verification") or {}
    return (
        f"model.onnx: verified against PyTorch on {check.get('samples')} inputs ({check.get('test_split_images')} "
        f"test-split images): max abs diff {check.get('max_abs_diff', float('nan')):.2g} "
        f"(tolerance {check.get('tolerance', float('nan')):g})"
    )
