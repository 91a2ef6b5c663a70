"""Library entry points of calibration: a run's val_select/val_calib scores, or any model's scores CSV.

``calibrate_run`` runs the estimator (``SelectiveConformal``: scaling and grid on val_select, SCRC-I, CRC or prediction
sets on val_calib), writes ``calibration/scaling.json`` and ``calibration/scrc_params.json`` and records which score
files it was fitted on (their fingerprints, in the params' ``data`` block and in ``provenance.json``).
``load_run_calibration`` is how evaluate, predict and export read a run's calibration: it refuses one whose scores are
no longer the current model's (the model was re-trained since), naming ``roadwork calibrate --run DIR``.
``calibrate_scores`` does the same for one CSV with columns ``p_roadwork,gate,label`` (and an optional ``group``).

Groups: in run mode each val_calib image's group comes from ``splits.json`` (``data.group_by``: a group column, file
names, near-duplicate clusters); in scores mode from the CSV's ``group`` column. Where a group holds more than one
image, the guarantee is certified over groups (``calibration/groups.py``) and the params say so (``unit``).
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.calibration.stats import positives_needed
from roadwork_cli.calibration.targets import CalibrationOutcome
from roadwork_cli.config import CalibrationSettings
from roadwork_cli.errors import InfeasibleError, UsageError
from roadwork_cli.io import provenance
from roadwork_cli.io.run import RunDir

CALIBRATE = "calibrate"
"""The stage name under which calibrate records its inputs in ``provenance.json``."""
REQUIRED_COLUMNS = ("p_roadwork", "gate", "label")


@dataclass
class ScoreTable:
    """Raw scores of one split or file: p (N,), gate (N,), label (N,) and optional ids/paths (N,)."""

    p: np.ndarray
    gate: np.ndarray
    label: np.ndarray
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    source: str = ""
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.p.size)

    def subset(self, index: np.ndarray) -> ScoreTable:
        pick = np.asarray(index)
        return ScoreTable(
            self.p[pick],
            self.gate[pick],
            self.label[pick],
            [self.ids[i] for i in pick] if self.ids else [],
            [self.paths[i] for i in pick] if self.paths else [],
            self.source,
            [self.groups[i] for i in pick] if self.groups else [],
        )


@dataclass
class CalibrationResult:
    """What calibration chose and wrote.

    Attributes:
        outcome: Thresholds and certified bounds (see ``CalibrationOutcome``).
        scaling: The scaling dict (also written as scaling.json in run mode and embedded in the params).
        params: The full scrc_params dict as written.
        params_path: Where the params were written.
        scaling_path: Where scaling.json was written (run mode only).
    """

    outcome: CalibrationOutcome
    scaling: dict[str, Any]
    params: dict[str, Any]
    params_path: Path
    scaling_path: Path | None = None

    @property
    def feasible(self) -> bool:
        return bool(self.outcome.feasible)


def _parse_probability(text: str, column: str, line: int, path: Path) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{path}, row {line}: {column}={text!r} is not a number.") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise UsageError(f"{path}, row {line}: {column}={text!r} is not a probability in [0, 1].")
    return value


def _parse_label(text: str, line: int, path: Path) -> int:
    cleaned = (text or "").strip().lower()
    if cleaned in ("1", "1.0", "true", "roadwork"):
        return 1
    if cleaned in ("0", "0.0", "false", "no_roadwork"):
        return 0
    raise UsageError(f"{path}, row {line}: label={text!r} is not 0 or 1.")


def read_scores_csv(path: str | Path) -> ScoreTable:
    """Read a scores CSV (``p_roadwork``, ``gate``, ``label``; ``id``/``path``/``group`` kept when present; others
    ignored).

    Raises:
        UsageError: Missing file or column, or a bad row (the message names the row's line number).
    """
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UsageError(f"Scores file {path} does not exist.") from None
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise UsageError(f"Scores file {path} lacks column(s) {', '.join(missing)}; needs p_roadwork,gate,label.")
        reader.fieldnames = columns
        p, gate, label, ids, paths, groups = [], [], [], [], [], []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row or any(row.get(c) is None for c in REQUIRED_COLUMNS):
                raise UsageError(f"{path}, row {line}: wrong number of fields.")
            p.append(_parse_probability(row["p_roadwork"], "p_roadwork", line, path))
            gate.append(_parse_probability(row["gate"], "gate", line, path))
            label.append(_parse_label(row["label"], line, path))
            ids.append(row.get("id") or "")
            paths.append(row.get("path") or "")
            groups.append((row.get("group") or "").strip())
    if not p:
        raise UsageError(f"Scores file {path} has no rows.")
    return ScoreTable(
        np.asarray(p), np.asarray(gate), np.asarray(label, dtype=int),
        ids if any(ids) else [], paths if any(paths) else [], str(path), groups if any(groups) else [],
    )  # fmt: skip


def infeasible_message(result: CalibrationResult, settings: CalibrationSettings) -> str:
    """The infeasibility note plus how many exited calibration positives the targets need at the least."""
    needed = positives_needed(settings.fnr, settings.delta, settings.delta_coverage_share, settings.grid_size)
    outcome = result.outcome
    return (
        f"{outcome.note} Certifying FNR <= {settings.fnr:g} at delta {settings.delta:g} needs at least {needed} "
        f"exited roadwork images in val_calib even with no misses; this calibration has {outcome.n_pos} roadwork "
        f"images of {outcome.n}. Until re-calibrated, this run defers every image"
        + (" (calibration.infeasible_decisions=fallback: it uses the fallback thresholds instead)."
           if settings.infeasible_decisions == "fallback" else ".")
    )  # fmt: skip


def _finish(result: CalibrationResult, settings: CalibrationSettings) -> CalibrationResult:
    if not result.outcome.feasible and not settings.allow_infeasible:
        error = InfeasibleError(
            f"{infeasible_message(result, settings)} Parameters were written to {result.params_path} with "
            '"feasible": false; '
            "relax --fnr/--coverage/--delta, add calibration data, or pass --allow-infeasible."
        )
        error.result = result  # type: ignore[attr-defined]  # lets the CLI render what is attainable
        raise error
    return result


def calibrate_run(run: RunDir | str | Path, settings: CalibrationSettings) -> CalibrationResult:
    """Calibrate a trained run: scaling + threshold grid from val_select, thresholds from val_calib.

    The score files' fingerprints go into the params' ``data`` block and into ``provenance.json`` (stage
    ``calibrate``), so that a model re-trained since is caught by :func:`load_run_calibration`.

    Args:
        run: Run directory with ``scores/val_select.csv`` and ``scores/val_calib.csv`` (written by train).
        settings: The calibration settings section.

    Raises:
        InfeasibleError: Targets not certifiable and ``allow_infeasible`` is off (files are written first).
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    select_path = run.require(run.score_file("val_select"), "train")
    calib_path = run.require(run.score_file("val_calib"), "train")
    select, calib = read_scores_csv(select_path), read_scores_csv(calib_path)
    estimator = SelectiveConformal(settings).fit(select.p, select.gate, select.label, n_calib=len(calib))
    fingerprints = {
        path.relative_to(run.root).as_posix(): provenance.fingerprint(path) for path in (select_path, calib_path)
    }
    source = {"mode": "run", "select": str(select_path), "calib": str(calib_path), "n_select": len(select),
              "fingerprints": fingerprints}  # fmt: skip
    outcome = estimator.conformalize(calib.p, calib.gate, calib.label, data=source, groups=_split_groups(run, calib))
    if outcome.unit == "images":
        _warn_of_near_duplicates(run)
    estimator.save(run.scrc_params, run.scaling)
    provenance.record(run, CALIBRATE, [select_path, calib_path])
    result = CalibrationResult(outcome, estimator.scaling, estimator.params, run.scrc_params, run.scaling)
    return _finish(result, settings)


def _split_groups(run: RunDir, table: ScoreTable) -> list[str] | None:
    """The group of every row of a run's scores (from splits.json), or None when no row has one."""
    if not table.ids or not run.splits.exists():
        return None
    from roadwork_cli.data.splits import Splits  # data is below calibration; imported here to keep start-up light

    samples = Splits.load(run.splits).samples
    groups = [(samples[i].group or "") if i in samples else "" for i in table.ids]
    return groups if any(groups) else None


def _warn_of_near_duplicates(run: RunDir) -> None:
    """Warn when val_calib holds near-duplicate clusters that this image-level certificate counts as independent."""
    if not run.splits.exists():
        return
    from roadwork_cli.data.splits import Splits

    clusters = Splits.load(run.splits).near_duplicate_clusters("val_calib")
    if clusters:
        images = sum(len(ids) for ids in clusters.values())
        warnings.warn(
            f"val_calib holds {len(clusters)} near-duplicate clusters ({images} images) that this calibration counts "
            "as independent images, which overstates the certificate. Set data.group_by: near_duplicates (or auto "
            "without a group column), re-run split and the stages after it, and calibrate certifies over groups.",
            stacklevel=2,
        )


def load_run_calibration(run: RunDir) -> SelectiveConformal:
    """The run's calibrated estimator, refused when the scores it was fitted on are not the current model's.

    Raises:
        UsageError: The run has no calibration (run ``roadwork calibrate``) or its files are unreadable.
        StaleError: ``scores/val_select.csv`` or ``scores/val_calib.csv`` changed since calibrate (e.g. train ran
            again, perhaps on another backbone); the message names ``roadwork calibrate --run DIR``.
    """
    params_path = run.require(run.scrc_params, CALIBRATE)
    provenance.check(run, CALIBRATE, CALIBRATE)
    return SelectiveConformal.load(run.scaling if run.scaling.exists() else None, params_path)


def split_rows(
    n: int, fraction: float, seed: int = 0, groups: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of row indices into (select, calib); independent of the scores themselves.

    With ``groups`` whole groups go one way (a row without a group is its own), so select and calib share no clip.
    """
    if not groups:
        order = np.random.default_rng(seed).permutation(n)
        n_select = int(round(fraction * n))
        return np.sort(order[:n_select]), np.sort(order[n_select:])
    keys = np.array([g if g else f"\0{i}" for i, g in enumerate(groups)], dtype=object)
    unique, index = np.unique(keys, return_inverse=True)
    chosen = np.random.default_rng(seed).permutation(unique.size)[: int(round(fraction * unique.size))]
    select = np.isin(index, chosen)
    return np.flatnonzero(select), np.flatnonzero(~select)


def calibrate_scores(scores_csv: str | Path, out: str | Path, settings: CalibrationSettings) -> CalibrationResult:
    """Calibrate any model's scores CSV and write the params JSON (scaling embedded) to ``out``.

    With ``scores_select_fraction`` = 0 (default) every row calibrates the thresholds, no scaling is fit and the
    lambda grid is data-free (evenly spaced on the score scale); otherwise that fraction of rows (seeded random)
    plays val_select.
    """
    table = read_scores_csv(scores_csv)
    select = None
    calib = table
    if settings.scores_select_fraction > 0:
        select_index, calib_index = split_rows(len(table), settings.scores_select_fraction, groups=table.groups or None)
        if select_index.size == 0 or calib_index.size == 0:
            raise UsageError(f"{scores_csv} has too few rows to hold out {settings.scores_select_fraction:g} of them.")
        select, calib = table.subset(select_index), table.subset(calib_index)
    estimator = SelectiveConformal(settings)
    if select is None:
        estimator.fit()
    else:
        estimator.fit(select.p, select.gate, select.label, n_calib=len(calib))
    source = {"mode": "scores", "scores": str(scores_csv), "n_select": 0 if select is None else len(select),
              "select_fraction": settings.scores_select_fraction}  # fmt: skip
    outcome = estimator.conformalize(calib.p, calib.gate, calib.label, data=source, groups=calib.groups or None)
    out = Path(out)
    estimator.save(out)
    return _finish(CalibrationResult(outcome, estimator.scaling, estimator.params, out), settings)


__all__ = [
    "CalibrationResult",
    "ScoreTable",
    "calibrate_run",
    "calibrate_scores",
    "infeasible_message",
    "load_run_calibration",
    "read_scores_csv",
    "split_rows",
]
