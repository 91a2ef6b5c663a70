"""Scoring a data source: a run's model over any ``--source`` -> a raw scores CSV (``evaluate --source``).

Example:
    >>> score_source("runs/demo", "photos/", Settings(), "runs/demo/eval/source/scores.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_path, atomic_write_text
from roadwork_cli.io.run import RunDir
from roadwork_cli.stage1 import Stage1Model

if TYPE_CHECKING:
    from roadwork_cli.config import Settings

__all__ = ["score_source"]


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
    Images are decoded exactly as the run's feature cache decoded them (its recorded recipe).

    Args:
        run: Trained run directory (checkpoints/best.*; calibration/* if present).
        source: Any ``--source`` accepted by ``roadwork split`` (folder, manifest, parquet, COCO, ``synthetic:N``).
        settings: Resolved settings (data section for reading the source, predict section for batching).
        out_csv: Where to write the scores CSV (atomically).
        progress: Show a progress bar on stderr.
    """
    from roadwork_cli.data.sources import SourceRejection, create_source

    run = run if isinstance(run, RunDir) else RunDir(run)
    model = Stage1Model.from_settings(run, settings)
    resolved = create_source(source, settings.data, run.synthetic)
    if resolved.prepare is not None:
        resolved.prepare(progress)
    records, rejected = [], []
    for item in resolved:
        if isinstance(item, SourceRejection):
            rejected.append({"path": item.locator, "reason": item.reason})
        else:
            records.append(item)
    p_raw, g_raw, errors = model.raw_scores(
        [r.locator for r in records], settings.predict.batch_size, settings.predict.workers, progress=progress
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
