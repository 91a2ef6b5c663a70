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
from roadwork_cli.calibration.scaling import create_scaler, fit_gate_scaler, softmax_response
from roadwork_cli.calibration.scrc import (
    CalibrationOutcome,
    SelectiveConformal,
    band_grid_from_scores,
    dkw_slack,
    fixed_band_grid,
    scrc_band,
)
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
        scaling.update(choose_selection_score(p_select, gate_scaler.transform(select.gate), select.label))
    return scaling


def choose_selection_score(p_select: np.ndarray, g_select: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Pick the selection score (gate head or softmax response) with the lower AURC on val_select.

    The choice uses val_select only, so it is fixed before val_calib is seen and the SCRC-I guarantee still holds.
    A gate head that learnt nothing (e.g. saturated because the training set was fit perfectly) loses to max(p, 1-p).
    """
    losses = ((p_select >= 0.5).astype(int) != labels).astype(float)
    candidates = {"gate": aurc(g_select, losses), "softmax_response": aurc(softmax_response(p_select), losses)}
    chosen = min(candidates, key=lambda name: (candidates[name], name != "gate"))  # ties keep the gate head
    return {"gate_score": chosen, "gate_score_aurc_select": candidates}


def _thresholds(data: dict[str, Any]) -> dict[str, Any]:
    """The thresholds block; band-rule params add "b" (and lambda is null)."""
    thresholds = {"rule": data["rule"], "lambda": data["lam"], "tau": data["tau"], "sets": data["set_thresholds"]}
    if data["rule"] == "band":
        thresholds["b"] = data["b"]
    return thresholds


def _params_dict(outcome: CalibrationOutcome, scaling: dict[str, Any], settings, source: dict[str, Any]) -> dict:
    import roadwork_cli

    data = outcome.to_dict()
    return {
        "version": PARAMS_VERSION,
        "library_version": roadwork_cli.__version__,
        "method": outcome.method,
        "gate_score": scaling.get("gate_score", settings.gate_score),
        "feasible": bool(outcome.feasible),
        "thresholds": _thresholds(data),
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
        "certified": {
            "fnr_upper": data["fnr_upper"],
            "coverage_lower": data["coverage_lower"],
            "pairs": outcome.certified_pairs,
        },  # fmt: skip
        "empirical": {
            "coverage": data["coverage"],
            "fnr": data["fnr"],
            "accuracy_on_exits": data["accuracy_on_exits"],
            "exited_positives": outcome.exited_positives,
            "misses": outcome.misses,
        },
        "attainable": data["attainable"],
        "grid": data["grid"],
        "per_lambda": data["per_lambda"],
        "note": outcome.note,
        "scaling": scaling,
        "data": source,
    }


def _band_grid(select: ScoreTable | None, calib: ScoreTable, settings, rule: StageRule) -> np.ndarray:
    """b grid for the band rule from calibrated p on val_select (data-free without val_select)."""
    if select is None or not len(select):
        return fixed_band_grid(settings.grid_size)
    p_select, _ = rule.calibrate(select.p, select.gate)
    # The DKW slack uses n and |B| (counts, not data), so the grid's lowest b still reaches the coverage bound.
    slack = dkw_slack(len(calib), settings.delta_coverage_share * settings.delta / settings.grid_size)
    return band_grid_from_scores(p_select, select.label, settings.grid_size, settings.coverage + slack, settings.fnr)


def _conformalize(select: ScoreTable | None, calib: ScoreTable, settings, scaling: dict[str, Any]):
    rule = StageRule.from_dicts(scaling, {"thresholds": {"lambda": None, "tau": 0.5}})
    if settings.rule == "band":
        if settings.method != "scrc":
            raise UsageError(
                f"calibration.rule=band is certified by SCRC-I only; set method=scrc (not {settings.method})."
            )
        p, _ = rule.calibrate(calib.p, calib.gate)
        grid = _band_grid(select, calib, settings, rule)
        return scrc_band(p, calib.label, grid, settings.fnr, settings.delta, settings.coverage,
                         settings.delta_coverage_share, settings.objective)  # fmt: skip
    sc = SelectiveConformal(
        alpha=settings.fnr,
        delta=settings.delta,
        xi=settings.coverage,
        method=settings.method,
        grid_size=settings.grid_size,
        delta_coverage_share=settings.delta_coverage_share,
        objective=settings.objective,
    )
    if select is not None and len(select):
        _, g_select = rule.calibrate(select.p, select.gate)
        # The grid may use n (a count, not data) so that its top level sits just inside the DKW-feasible region.
        slack = dkw_slack(len(calib), settings.delta_coverage_share * settings.delta)
        sc.fit(g_select, xi=min(settings.coverage + slack, 1.0))
    else:
        sc.fit(None, score_range=(0.5, 1.0) if scaling["gate_score"] == "softmax_response" else (0.0, 1.0))
    p, g = rule.calibrate(calib.p, calib.gate)
    return sc.conformalize(p, g, calib.label)


def _finish(result: CalibrationResult, settings) -> CalibrationResult:
    if not result.outcome.feasible and not settings.allow_infeasible:
        error = InfeasibleError(
            f'{result.outcome.note} Parameters were written to {result.params_path} with "feasible": false; '
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
    "read_scores_csv",
    "softmax_response",
    "split_rows",
]
