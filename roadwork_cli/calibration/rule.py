"""``StageRule``: the calibrated stage-1 rule as predict, export and evaluate use it.

It reads the two JSON files written by calibrate (``scaling.json`` and ``scrc_params.json``; the latter embeds a copy
of the scaling, so it alone suffices), calibrates raw scores and applies the rule object of ``rules.py``.

Params files of version 1 load as they are, including those without ``thresholds.rule`` (gate rule) and prediction-set
files written with ``rule: gate``. An infeasible calibration defers every image unless the params say
``infeasible_decisions: fallback`` (files without that key, older ones included, defer: the safe choice).

Example:
    >>> rule = StageRule.load(run.scaling, run.scrc_params)
    >>> p, g = rule.calibrate(p_raw, gate_raw)
    >>> rule.decide(p_raw, gate_raw)  # array of "roadwork" / "no_roadwork" / "defer"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork_cli.calibration.rules import Rule, create_method, rule_from_params
from roadwork_cli.calibration.scaling import Scaler, scaler_from_dict, softmax_response
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import read_json

GATE_SCORES = ("gate", "softmax_response")


class StageRule:
    """Scaling of p and of the gate, the selection-score choice, and the rule with its thresholds.

    Attributes:
        cls_scaler: Maps raw p(roadwork) to calibrated p.
        gate_scaler: Maps the raw gate to a calibrated P(decision right) (unused with softmax_response).
        gate_score: "gate" or "softmax_response" (max(p, 1 - p) of the calibrated p).
        params: The scrc_params dict (thresholds, targets, certified bounds).
        decision_rule: The rule object built from ``params["thresholds"]``.
    """

    def __init__(self, cls_scaler: Scaler, gate_scaler: Scaler, gate_score: str, params: dict[str, Any]):
        if gate_score not in GATE_SCORES:
            raise UsageError(f"Unknown gate_score {gate_score!r}; expected 'gate' or 'softmax_response'.")
        self.cls_scaler = cls_scaler
        self.gate_scaler = gate_scaler
        self.gate_score = gate_score
        self.params = params
        self.decision_rule: Rule = rule_from_params(params)

    @classmethod
    def from_dicts(cls, scaling: dict[str, Any] | None, params: dict[str, Any]) -> StageRule:
        """Build from the parsed JSON; ``scaling=None`` uses the copy embedded in ``params`` (or no scaling)."""
        if not isinstance(params, dict) or not isinstance(params.get("thresholds"), dict):
            raise UsageError("Calibration parameters lack 'thresholds'; re-run `roadwork calibrate`.")
        scaling = scaling if scaling is not None else params.get("scaling") or {}
        try:
            cls_scaler = scaler_from_dict(scaling.get("cls"))
            gate_scaler = scaler_from_dict(scaling.get("gate"))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"Bad scaling parameters: {exc}") from None
        gate_score = str(scaling.get("gate_score") or params.get("gate_score") or "gate")
        return cls(cls_scaler, gate_scaler, gate_score, params)

    @classmethod
    def load(cls, scaling_path: Path | None, params_path: Path) -> StageRule:
        """Read ``scaling.json`` (optional) and ``scrc_params.json``."""
        try:
            params = read_json(params_path)
            scaling = read_json(scaling_path) if scaling_path is not None else None
        except FileNotFoundError as exc:
            raise UsageError(f"{exc.filename} does not exist; run `roadwork calibrate` first.") from None
        except ValueError as exc:
            raise UsageError(f"Calibration file is not valid JSON: {exc}") from None
        return cls.from_dicts(scaling, params)

    @property
    def rule(self) -> str:
        """ "gate", "band" or "sets"."""
        return self.decision_rule.name

    @property
    def lam(self) -> float | None:
        """Gate threshold lambda (None = everything exits, or not the gate rule)."""
        return getattr(self.decision_rule, "lam", None)

    @property
    def tau(self) -> float | None:
        """Decision threshold tau on calibrated p (None for prediction sets)."""
        return getattr(self.decision_rule, "tau", None)

    @property
    def b(self) -> float | None:
        """Upper threshold of the band rule: roadwork iff p >= b (None for other rules)."""
        return getattr(self.decision_rule, "b", None)

    @property
    def feasible(self) -> bool:
        """Whether calibration met its targets (files without the key are taken as feasible)."""
        return bool(self.params.get("feasible", True))

    @property
    def certified(self) -> bool:
        """Whether calibration certified the targets with probability >= 1 - delta (:func:`is_certified`)."""
        return is_certified(self.params)

    @property
    def defers_everything(self) -> bool:
        """Whether this rule defers every image (:func:`defers_everything`)."""
        return defers_everything(self.params)

    def calibrate(self, p_raw, gate_raw) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated p(roadwork) and selection score g, both shape (N,)."""
        p = self.cls_scaler.transform(np.asarray(p_raw, dtype=float))
        if self.gate_score == "softmax_response":
            return p, softmax_response(p)
        return p, self.gate_scaler.transform(np.asarray(gate_raw, dtype=float))

    def set_sizes(self, p_raw, gate_raw) -> np.ndarray:
        """Prediction-set size per image, shape (N,) (2 = deferred)."""
        p, g = self.calibrate(p_raw, gate_raw)
        if self.defers_everything:
            return np.full(p.shape, 2)
        return self.decision_rule.set_sizes(p, g)

    def describe(self) -> str:
        """The rule with its thresholds in words."""
        return self.decision_rule.describe(self.gate_score)

    def decide(self, p_raw, gate_raw) -> np.ndarray:
        """Decisions, shape (N,), each "roadwork", "no_roadwork" or "defer"."""
        p, g = self.calibrate(p_raw, gate_raw)
        if self.defers_everything:
            return np.full(p.shape, "defer").astype(str)
        return self.decision_rule.decide(p, g)


def is_certified(params: dict[str, Any]) -> bool:
    """Whether the calibration in ``params`` (``scrc_params.json``) certified its targets with probability >= 1 - delta.

    The recorded certificate decides; older files without one count as certified when feasible under a
    high-probability method (SCRC-I), never under CRC, whose bound holds in expectation only.
    """
    stated = (params.get("certified") or {}).get("targets")
    if stated is not None:
        return bool(stated)
    return bool(params.get("feasible", True)) and create_method(str(params.get("method") or "scrc")).high_probability


def defers_everything(params: dict[str, Any]) -> bool:
    """An infeasible calibration defers every image unless its params ask for the fallback thresholds."""
    return not params.get("feasible", True) and params.get("infeasible_decisions", "defer") != "fallback"
