"""Stage 1 under the NATIX validators' challenge levels 0-3: ``roadwork evaluate --robustness``.

The split (test by default) is scored once per level. Each image's challenge view is seeded by
``augment_seed(image_id, view=level)``, so a re-run draws the same crops, rotations and degradations and gets the same
scores; the raw scores of each level are cached in ``eval/robustness/level_<k>.csv`` (keyed by the checkpoint, the
split and the augmentation, see ``meta.json`` there), so re-calibrating and re-evaluating does not re-run the backbone.

Per level the calibrated rule is applied as on clean data (``compute_report``) and the NATIX reward is added:
``(0.5 * MCC + 0.5 * accuracy) ** 3`` of the p >= 0.5 decision on every image, as the validators score a miner.
``satisfied`` says whether the guarantee's targets (FNR on exits <= alpha, coverage >= xi) held on that level's images.
The guarantee itself is only promised for the calibration distribution; on challenge levels it is measured, not
promised (``ROBUSTNESS_NOTE``).

Example:
    >>> report = evaluate_robustness("runs/demo", Settings())  # doctest: +SKIP
    >>> report["robustness"]["level_3"]["natix_reward"]  # doctest: +SKIP
    0.41
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from roadwork_cli.calibration.api import ScoreTable, load_run_calibration, read_scores_csv
from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_path, atomic_write_json, atomic_write_text, read_json
from roadwork_cli.io.progress import progress_bar
from roadwork_cli.io.records import read_best_record
from roadwork_cli.io.run import RunDir

if TYPE_CHECKING:
    from rich.table import Table

    from roadwork_cli.config import Settings
    from roadwork_cli.stage1 import Stage1Model

__all__ = [
    "LEVELS",
    "ROBUSTNESS_NOTE",
    "evaluate_robustness",
    "natix_reward",
    "robustness_block",
    "robustness_table",
    "score_levels",
]

LEVELS = (0, 1, 2, 3)
ROBUSTNESS_NOTE = (
    "The guarantee (FNR on exits <= alpha and coverage >= xi, with probability >= 1 - delta) is only promised for the "
    "calibration distribution, i.e. clean images like val_calib; on the NATIX challenge levels it is measured, not "
    "promised, and 'satisfied' only says whether the targets held on that level's images."
)
CACHE_FORMAT = 1
# Keys of compute_report that are the same on every level (the run's thresholds and calibration) or only words.
_RUN_WIDE_KEYS = ("thresholds", "calibration", "selective_targets", "summary", "decision_counts")


def natix_reward(mcc: float | None, accuracy: float | None) -> float | None:
    """The validators' score of a miner: ``(0.5 * MCC + 0.5 * accuracy) ** 3``.

    MCC is in [-1, 1], so the base can be negative (a worse-than-chance miner gets a negative reward); an undefined
    MCC counts as 0, as sklearn's ``matthews_corrcoef`` reports it.
    """
    if accuracy is None:
        return None
    return float((0.5 * (mcc or 0.0) + 0.5 * accuracy) ** 3)


def _cache_key(run: RunDir, ids: list[str], labels: list[int], model: Stage1Model) -> dict[str, Any]:
    """What decides a level's raw scores: the trained head, the backbone, the images, the challenge."""
    from roadwork_cli.data.transforms import create_augmentation

    best = run.require(run.best_weights, "train")
    best_json = read_best_record(run)
    images = hashlib.sha256("\n".join(f"{i}:{y}" for i, y in zip(ids, labels, strict=True)).encode()).hexdigest()
    key = {
        "format": CACHE_FORMAT,
        "head": hashlib.sha256(best.read_bytes()).hexdigest(),
        "backbone": (best_json.backbone or {}).get("fingerprint") or best_json.fingerprint,
        "images": images,
        "recipe": model.recipe_record(),
        "natix": {k: create_augmentation("natix", model.preprocessing, level=k).spec for k in LEVELS},
    }
    return json.loads(json.dumps(key))  # tuples -> lists, as meta.json reads back


def _score_level(
    model: Stage1Model, locators: list[str], ids: list[str], level: int, batch_size: int, workers: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Raw p and gate (N,) of each image's level-``level`` challenge (NaN where it failed) and the failure reasons."""
    from roadwork_cli.data.decode import ImageDataset, create_loader
    from roadwork_cli.data.transforms import augment_seed, create_augmentation

    challenge = create_augmentation("natix", model.preprocessing, output="uint8", level=level)
    # Validators crop and rotate the full photo; a draft-decoded (downscaled) JPEG would blur the 20 % crops of level
    # 1+ more than theirs, so the challenge starts from the full-resolution decode.
    recipe = replace(model.recipe, jpeg_draft=False)
    seeds = [augment_seed(image_id, view=level) for image_id in ids]
    dataset = ImageDataset(locators, recipe, seeds=seeds, augment=challenge)
    loader = create_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=model.device.type == "cuda")
    n = len(ids)
    p_raw, g_raw = np.full(n, np.nan), np.full(n, np.nan)
    errors: list[str | None] = [None] * n
    with progress_bar(f"robustness level {level}", total=n, unit="img", enabled=progress) as advance:
        for indices, pixels, failed in loader:
            for index, reason in failed:
                errors[index] = reason
            if pixels is not None:
                p_raw[indices], g_raw[indices] = model.forward_raw(pixels)  # (B,) each
            advance(len(indices) + len(failed))
    return p_raw, g_raw, errors


def _write_level(path: Path, ids, locators, labels, p_raw, g_raw, errors) -> None:
    """``level_<k>.csv`` (a scores CSV: id, path, label, p_roadwork, gate) and ``level_<k>.rejected.jsonl``."""
    rejected = []
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["id", "path", "label", "p_roadwork", "gate"])
            for row in zip(ids, locators, labels, p_raw, g_raw, errors, strict=True):
                image_id, locator, label, p, g, error = row
                if error is not None:
                    rejected.append({"id": image_id, "path": locator, "reason": error})
                    continue
                writer.writerow([image_id, locator, int(label), f"{p:.8g}", f"{g:.8g}"])
    atomic_write_text(path.with_suffix(".rejected.jsonl"), "".join(json.dumps(r) + "\n" for r in rejected))


def score_levels(
    run: RunDir | str | Path,
    settings: Settings,
    split: str = "test",
    levels: tuple[int, ...] = LEVELS,
    progress: bool = False,
) -> dict[int, ScoreTable]:
    """Raw scores of ``split`` at each NATIX level, from ``eval/robustness/level_<k>.csv`` or computed and cached.

    A cached level is re-used only while ``eval/robustness/meta.json`` matches the run's checkpoint, backbone, split
    and challenge; otherwise every level is scored again. Each level's CSV is written atomically once it is complete,
    so an interrupted evaluation resumes with the levels it had finished.

    Args:
        run: Trained run directory (splits.json, checkpoints/best.*).
        settings: Resolved settings (runtime device and precision, predict batch size and workers, data limits).
        split: Split to score.
        levels: NATIX levels, each in 0-3.
        progress: Show a progress bar per level on stderr.

    Raises:
        UsageError: Unknown level or split, or a split without images.
    """
    from roadwork_cli.data.splits import Splits

    run = run if isinstance(run, RunDir) else RunDir(run)
    if any(level not in LEVELS for level in levels):
        raise UsageError(f"NATIX levels are 0, 1, 2 and 3; got {list(levels)}.")
    splits = Splits.load(run.require(run.splits, "split"))
    ids = splits.ids(split)
    if not ids:
        raise UsageError(f"Split {split!r} of {run.root} holds no images to score for --robustness.")
    locators = [splits.samples[i].path for i in ids]
    labels = [splits.samples[i].label for i in ids]
    folder = run.eval / "robustness" / split if split != "test" else run.eval / "robustness"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {level: folder / f"level_{level}.csv" for level in levels}

    from roadwork_cli.stage1 import Stage1Model

    model = Stage1Model.from_settings(run, settings)
    key = _cache_key(run, ids, labels, model)
    meta = folder / "meta.json"
    if not meta.exists() or read_json(meta) != key:
        for stale in folder.glob("level_*"):
            stale.unlink()
        atomic_write_json(meta, key)
    tables = {}
    for level, path in paths.items():
        if not path.exists():
            batch, workers = settings.predict.batch_size or model.default_batch_size, settings.predict.workers
            p_raw, g_raw, errors = _score_level(model, locators, ids, level, batch, workers, progress)
            _write_level(path, ids, locators, labels, p_raw, g_raw, errors)
        tables[level] = read_scores_csv(path)
    return tables


def robustness_block(
    tables: dict[int, ScoreTable], rule: SelectiveConformal, n_images: int | None = None
) -> dict[str, Any]:
    """The ``robustness`` block of report.json: ``level_<k>`` -> every metric of ``compute_report`` on that level,
    plus ``natix_reward``, ``satisfied`` and ``n_failed``; and ``note`` (the guarantee's scope).

    Args:
        tables: Raw scores per level (``score_levels``).
        rule: The run's calibrated rule.
        n_images: Images of the split, to count those a level could not score (None: not counted).
    """
    from roadwork_cli.reporting.evaluate import compute_report

    block: dict[str, Any] = {}
    for level, table in sorted(tables.items()):
        report = compute_report(table, rule)
        metrics = {key: value for key, value in report.items() if key not in _RUN_WIDE_KEYS}
        metrics["natix_reward"] = natix_reward(report["mcc"], report["accuracy"])
        metrics["satisfied"] = report["guarantee"]["satisfied"]  # None: FNR not testable on this level
        metrics["n_failed"] = None if n_images is None else int(n_images - len(table))
        block[f"level_{level}"] = metrics
    block["note"] = ROBUSTNESS_NOTE
    block["seeding"] = "each image's view of level k is seeded by augment_seed(image id, view=k)"
    return block


def evaluate_robustness(
    run: RunDir | str | Path, settings: Settings, split: str = "test", progress: bool = False
) -> dict[str, Any]:
    """Score ``split`` at NATIX levels 0-3 and add the ``robustness`` block (and its plot) to the run's report.

    Run after ``evaluate_run`` on the same split: the block goes into that split's report (``eval/report.json`` for
    test, :meth:`RunDir.split_report`) beside the clean metrics, the plot ``robustness.png`` beside it, and
    ``report.html`` is rendered again with both.

    Returns:
        The updated report.
    """
    from roadwork_cli.data.splits import Splits
    from roadwork_cli.reporting.evaluate import add_to_report

    run = run if isinstance(run, RunDir) else RunDir(run)
    rule = load_run_calibration(run)
    report_path = run.require(run.split_report(split), "evaluate")
    tables = score_levels(run, settings, split=split, progress=progress)
    n_images = len(Splits.load(run.splits).ids(split))
    block = robustness_block(tables, rule, n_images)
    figures = {}
    try:
        from roadwork_cli.reporting.plots import plot_robustness

        figures["robustness"] = plot_robustness(report_path.parent / "robustness.png", block)
    except ImportError:  # matplotlib missing: the numbers still count
        pass
    return add_to_report(report_path, {"robustness": block}, figures)


def robustness_table(block: dict[str, Any], title: str = "robustness (NATIX challenge levels)") -> Table:
    """Rich table of a ``robustness`` block: one row per level, the guarantee's scope as the caption."""
    from rich.table import Table

    from roadwork_cli.reporting.tables import ROBUSTNESS_COLUMNS, format_value, robustness_rows

    table = Table(title=title, caption=block.get("note", ROBUSTNESS_NOTE), caption_justify="left")
    table.add_column("level", justify="right")
    for header, _ in ROBUSTNESS_COLUMNS:
        table.add_column(header, justify="right")
    for level, values in robustness_rows(block):
        table.add_row(level, *(format_value(value) for value in values))
    return table
