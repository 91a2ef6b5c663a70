"""Library entry points of calibration: a run's val_select/val_calib scores, or any model's scores CSV.

``calibrate_run`` fits probability scaling on val_select, fixes the lambda grid from val_select, runs SCRC-I (or CRC /
prediction sets) on val_calib and writes ``calibration/scaling.json`` and ``calibration/scrc_params.json``.
``calibrate_scores`` does the same for one CSV with columns ``p_roadwork,gate,label``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadwork_cli.calibration.rule import StageRule
from roadwork_cli.calibration.rules import CalibrationOutcome, SelectiveConformal
from roadwork_cli.calibration.scaling import create_scaler, fit_gate_scaler, softmax_response
from roadwork_cli.calibration.stats import positives_needed
from roadwork_cli.errors import InfeasibleError, UsageError
from roadwork_cli.io.atomic import atomic_write_json
from roadwork_cli.io.run import RunDir
from roadwork_cli.metrics.selective import aurc

PARAMS_VERSION = 1
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
    """Read a scores CSV (``p_roadwork``, ``gate``, ``label``; ``id``/``path`` kept when present; others ignored).

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
        p, gate, label, ids, paths = [], [], [], [], []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row or any(row.get(c) is None for c in REQUIRED_COLUMNS):
                raise UsageError(f"{path}, row {line}: wrong number of fields.")
            p.append(_parse_probability(row["p_roadwork"], "p_roadwork", line, path))
            gate.append(_parse_probability(row["gate"], "gate", line, path))
            label.append(_parse_label(row["label"], line, path))
            ids.append(row.get("id") or "")
            paths.append(row.get("path") or "")
    if not p:
        raise UsageError(f"Scores file {path} has no rows.")
    return ScoreTable(
        np.asarray(p), np.asarray(gate), np.asarray(label, dtype=int),
        ids if any(ids) else [], paths if any(paths) else [], str(path),
    )  # fmt: skip


def fit_scaling(select: ScoreTable | None, settings) -> dict[str, Any]:
    """Fit the p and gate scalers on val_select (identity when there is none); returns the scaling.json dict."""
    if select is None or len(select) == 0:
        gate_score = "gate" if settings.gate_score == "auto" else settings.gate_score
        return {"cls": {"method": "none", "params": {}}, "gate": {"method": "none", "params": {}},
                "gate_score": gate_score}  # fmt: skip
    cls_scaler = create_scaler(settings.scaling).fit(select.p, select.label)
    p_select = cls_scaler.transform(select.p)
    gate_scaler = fit_gate_scaler(settings.gate_scaling, select.gate, p_select, select.label)
    scaling = {"cls": cls_scaler.to_dict(), "gate": gate_scaler.to_dict(), "gate_score": settings.gate_score}
    if settings.gate_score == "auto":
        scaling.update(
            choose_selection_score(p_select, gate_scaler.transform(select.gate), select.label, alpha=settings.fnr)
        )
    return scaling


def choose_selection_score(
    p_select: np.ndarray, g_select: np.ndarray, labels: np.ndarray, alpha: float | None = None
) -> dict[str, Any]:
    """Pick the selection score (gate head or softmax response) with the lower AURC on val_select.

    The errors ranked are those of the decision the rule will make: with ``alpha`` (the FNR target), p >= the
    alpha-quantile of the positives' p on val_select, which is about where SCRC-I puts tau; without it, p >= 0.5.
    Ranking errors at 0.5 favours max(p, 1 - p), which is symmetric around 0.5, even when the rule decides far below it.
    The choice uses val_select only, so it is fixed before val_calib is seen and the SCRC-I guarantee still holds.
    A gate head that learnt nothing (e.g. saturated because the training set was fit perfectly) loses to max(p, 1-p).
    """
    positives = p_select[labels == 1]
    threshold = float(np.quantile(positives, alpha)) if alpha is not None and positives.size else 0.5
    losses = ((p_select >= threshold).astype(int) != labels).astype(float)
    candidates = {"gate": aurc(g_select, losses), "softmax_response": aurc(softmax_response(p_select), losses)}
    chosen = min(candidates, key=lambda name: (candidates[name], name != "gate"))  # ties keep the gate head
    return {"gate_score": chosen, "gate_score_aurc_select": candidates, "gate_score_threshold": threshold}


def _params_dict(outcome: CalibrationOutcome, scaling: dict[str, Any], settings, source: dict[str, Any]) -> dict:
    from roadwork_cli.version import __version__

    data = outcome.to_dict()
    return {
        "version": PARAMS_VERSION,
        "library_version": __version__,
        "method": outcome.method,
        "gate_score": scaling.get("gate_score", settings.gate_score),
        "feasible": bool(outcome.feasible),
        "infeasible_decisions": settings.infeasible_decisions,
        # Whether an infeasible outcome was asked to pass (exit 0) or not (exit 3): export's refusal names which.
        "allow_infeasible": bool(settings.allow_infeasible),
        "thresholds": data["thresholds"],
        "targets": {
            "alpha": outcome.alpha,
            "delta": outcome.delta,
            "xi": outcome.xi,
            "delta1": outcome.delta1,
            "delta2": outcome.delta2,
            "delta_coverage_share": settings.delta_coverage_share,
            "objective": settings.objective,
        },
        "n": outcome.n,
        "n_pos": outcome.n_pos,
        # Only "FNR <= alpha" is certified; the CP bound at the chosen tau is pointwise (tau was picked on the data).
        "certified": {
            "targets": outcome.certified,
            "fnr_at_most": outcome.alpha if outcome.certified else None,
            "fnr_upper_pointwise": data["fnr_upper_pointwise"],
            "coverage_lower": data["coverage_lower"],
            "pairs": outcome.certified_pairs,
        },
        "empirical": {
            "coverage": data["coverage"],
            "fnr": data["fnr"],
            "accuracy_on_exits": data["accuracy_on_exits"],
            "exited_positives": outcome.exited_positives,
            "misses": outcome.misses,
        },
        "attainable": data["attainable"],
        "grid": data["grid"],
        "per_grid": data["per_grid"],
        "note": outcome.note,
        "scaling": scaling,
        "data": source,
    }


def _conformalize(select: ScoreTable | None, calib: ScoreTable, settings, scaling: dict[str, Any]):
    sc = SelectiveConformal(
        alpha=settings.fnr,
        delta=settings.delta,
        xi=settings.coverage,
        method=settings.method,
        rule=settings.rule,
        grid_size=settings.grid_size,
        delta_coverage_share=settings.delta_coverage_share,
        objective=settings.objective,
    )
    scores = StageRule.from_dicts(scaling, {"thresholds": {"lambda": None, "tau": 0.5}})
    if select is not None and len(select):
        p_select, g_select = scores.calibrate(select.p, select.gate)
        # The grid may use n (a count, not data) so that it reaches just inside the DKW-feasible region.
        sc.fit(p_select, g_select, select.label, n_calib=len(calib))
    else:
        sc.fit(score_range=(0.5, 1.0) if scaling["gate_score"] == "softmax_response" else (0.0, 1.0))
    p, g = scores.calibrate(calib.p, calib.gate)
    return sc.conformalize(p, g, calib.label)


def infeasible_message(result: CalibrationResult, settings) -> str:
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


def _finish(result: CalibrationResult, settings) -> CalibrationResult:
    if not result.outcome.feasible and not settings.allow_infeasible:
        error = InfeasibleError(
            f"{infeasible_message(result, settings)} Parameters were written to {result.params_path} with "
            '"feasible": false; '
            "relax --fnr/--coverage/--delta, add calibration data, or pass --allow-infeasible."
        )
        error.result = result  # type: ignore[attr-defined]  # lets the CLI render what is attainable
        raise error
    return result


def calibrate_run(run: RunDir | str | Path, settings) -> CalibrationResult:
    """Calibrate a trained run: scaling + lambda grid from val_select, thresholds from val_calib.

    Args:
        run: Run directory with ``scores/val_select.csv`` and ``scores/val_calib.csv`` (written by train).
        settings: ``CalibrationSettings`` (or full ``Settings``, whose calibration section is used).

    Raises:
        InfeasibleError: Targets not certifiable and ``allow_infeasible`` is off (files are written first).
    """
    settings = getattr(settings, "calibration", settings)
    run = run if isinstance(run, RunDir) else RunDir(run)
    select_path = run.require(run.scores / "val_select.csv", "train")
    calib_path = run.require(run.scores / "val_calib.csv", "train")
    select, calib = read_scores_csv(select_path), read_scores_csv(calib_path)
    scaling = fit_scaling(select, settings)
    outcome = _conformalize(select, calib, settings, scaling)
    source = {"mode": "run", "select": str(select_path), "calib": str(calib_path), "n_select": len(select)}
    params = _params_dict(outcome, scaling, settings, source)
    atomic_write_json(run.scaling, scaling)
    atomic_write_json(run.scrc_params, params)
    return _finish(CalibrationResult(outcome, scaling, params, run.scrc_params, run.scaling), settings)


def split_rows(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of row indices into (select, calib); independent of the scores themselves."""
    order = np.random.default_rng(seed).permutation(n)
    n_select = int(round(fraction * n))
    return np.sort(order[:n_select]), np.sort(order[n_select:])


def calibrate_scores(scores_csv: str | Path, out: str | Path, settings) -> CalibrationResult:
    """Calibrate any model's scores CSV and write the params JSON (scaling embedded) to ``out``.

    With ``scores_select_fraction`` = 0 (default) every row calibrates the thresholds, no scaling is fit and the
    lambda grid is data-free (evenly spaced on the score scale); otherwise that fraction of rows (seeded random)
    plays val_select.
    """
    settings = getattr(settings, "calibration", settings)
    table = read_scores_csv(scores_csv)
    select = None
    calib = table
    if settings.scores_select_fraction > 0:
        select_index, calib_index = split_rows(len(table), settings.scores_select_fraction)
        if select_index.size == 0 or calib_index.size == 0:
            raise UsageError(f"{scores_csv} has too few rows to hold out {settings.scores_select_fraction:g} of them.")
        select, calib = table.subset(select_index), table.subset(calib_index)
    scaling = fit_scaling(select, settings)
    outcome = _conformalize(select, calib, settings, scaling)
    source = {"mode": "scores", "scores": str(scores_csv), "n_select": 0 if select is None else len(select),
              "select_fraction": settings.scores_select_fraction}  # fmt: skip
    params = _params_dict(outcome, scaling, settings, source)
    out = Path(out)
    atomic_write_json(out, params)
    return _finish(CalibrationResult(outcome, scaling, params, out), settings)


__all__ = [
    "CalibrationResult",
    "ScoreTable",
    "calibrate_run",
    "calibrate_scores",
    "fit_scaling",
    "infeasible_message",
    "read_scores_csv",
    "softmax_response",
    "split_rows",
]
