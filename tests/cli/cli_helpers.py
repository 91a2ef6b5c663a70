"""What several CLI test modules build: a tiny exportable run and a few small JPEGs.

A plain module (not a conftest) so that tests import what they use by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from split_helpers import write_splits

from roadwork_cli.io.run import RunDir


def make_tiny_run(root, lam: float = 0.3, tau: float = 0.5, weights_file=None) -> RunDir:
    """A run with everything export needs: head checkpoint + record, calibration, splits and metrics.

    The head is random (seeded) over a ``tiny_vit`` backbone, the calibration a gate rule with thresholds
    ``lam`` (exit iff gate >= lam) and ``tau`` (roadwork iff p >= tau) under temperature scaling.
    """
    import torch

    from roadwork_cli.io.atomic import atomic_write_json
    from roadwork_cli.io.records import BestRecord
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.training.artifacts import write_best

    run = RunDir(root).ensure()
    backbone = create_backbone("tiny_vit", weights=weights_file)
    torch.manual_seed(1)
    head = SelectiveHead(backbone.feature_dim, hidden=8, dropout=0.0)
    record = BestRecord(
        head=head.config, backbone=backbone.spec, fingerprint=backbone.fingerprint, epoch=3, select_metric="mcc",
        metric=None, val_select={}, ema=False,
    )  # fmt: skip
    write_best(run, head, record)
    scaling = {
        "cls": {"method": "temperature", "params": {"temperature": 1.5}},
        "gate": {"method": "none", "params": {}},
        "gate_score": "gate",
    }
    atomic_write_json(run.scaling, scaling)
    atomic_write_json(
        run.scrc_params, {"method": "scrc", "thresholds": {"lambda": lam, "tau": tau}, "scaling": scaling}
    )
    write_splits(run, {}, {})
    run.metrics.write_text("epoch,loss\n1,0.7\n")
    return run


def write_images(folder: Path, n: int = 3, size=(96, 72)) -> list[Path]:
    """``n`` distinct solid-colour JPEGs ``img_<i>.jpg`` in ``folder`` (created), in order."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.jpg"
        Image.new("RGB", size, (40 * i, 100, 200 - 30 * i)).save(path, quality=90)
        paths.append(path)
    return paths


def export_tiny_bundle(root: Path) -> Path:
    """``roadwork export`` of :func:`make_tiny_run` under ``root``: the bundle's path."""
    from typer.testing import CliRunner

    from roadwork_cli.cli.app import app

    run = make_tiny_run(root / "run")
    result = CliRunner().invoke(app, ["export", "--run", str(run.root)])
    assert result.exit_code == 0, result.output
    assert run.bundle.is_file()
    return run.bundle


def jsonl_records(text: str) -> list[dict]:
    """The JSON Lines records of ``text`` (blank lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]
