"""The stage-1 decision rule: calibrate raw scores, then decide roadwork / no_roadwork / defer.

Rule "gate" (the default, and what a params file without ``thresholds.rule`` means): exit iff g >= lambda; on exit
roadwork iff p >= tau. Rule "band": no_roadwork iff p < tau, roadwork iff p >= b, defer iff tau <= p < b (the
selection score g plays no role).

``StageRule`` is what predict, export and evaluate share; it only needs the two JSON files written by calibrate
(``scaling.json`` and ``scrc_params.json``; the latter embeds a copy of the scaling, so it alone suffices).

Example:
    >>> rule = StageRule.load(run.scaling, run.scrc_params)
    >>> p, g = rule.calibrate(p_raw, gate_raw)
    >>> rule.decide(p_raw, gate_raw)  # array of "roadwork" / "no_roadwork" / "defer"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork_cli.calibration.scaling import Scaler, scaler_from_dict, softmax_response
from roadwork_cli.calibration.scrc import decide as _decide
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import read_json


class StageRule:
    """Scaling of p and of the gate, the selection-score choice, and the thresholds.

    Attributes:
        cls_scaler: Maps raw p(roadwork) to calibrated p.
        gate_scaler: Maps the raw gate to a calibrated P(decision right) (unused with softmax_response).
        gate_score: "gate" or "softmax_response" (max(p, 1 - p) of the calibrated p).
        params: The scrc_params dict (thresholds, targets, certified bounds).
    """

    def __init__(self, cls_scaler: Scaler, gate_scaler: Scaler, gate_score: str, params: dict[str, Any]):
        if gate_score not in ("gate", "softmax_response"):
            raise UsageError(f"Unknown gate_score {gate_score!r}; expected 'gate' or 'softmax_response'.")
        self.cls_scaler = cls_scaler
        self.gate_scaler = gate_scaler
        self.gate_score = gate_score
        self.params = params

    @classmethod
    def from_dicts(cls, scaling: dict[str, Any] | None, params: dict[str, Any]) -> StageRule:
        """Build from the parsed JSON; ``scaling=None`` uses the copy embedded in ``params`` (or no scaling)."""
        if not isinstance(params, dict) or "thresholds" not in params:
            raise UsageError("Calibration parameters lack 'thresholds'; re-run `roadwork calibrate`.")
        rule = params["thresholds"].get("rule") or "gate"
        if rule not in ("gate", "band"):
            raise UsageError(f"Unknown decision rule {rule!r} in the calibration parameters; expected gate or band.")
        if rule == "band" and (params["thresholds"].get("b") is None or params["thresholds"].get("tau") is None):
            raise UsageError("Band-rule calibration parameters need thresholds 'b' and 'tau'; re-run calibrate.")
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
    def lam(self) -> float | None:
        """Gate threshold lambda (None = everything exits, or prediction-set mode)."""
        value = self.params["thresholds"].get("lambda")
        return None if value is None else float(value)

    @property
    def rule(self) -> str:
        """ "gate" or "band" (old params files without ``thresholds.rule`` are gate rules)."""
        return str(self.params["thresholds"].get("rule") or "gate")

    @property
    def b(self) -> float | None:
        """Upper threshold of the band rule: roadwork iff p >= b (None for the gate rule)."""
        value = self.params["thresholds"].get("b")
        return None if value is None or self.rule != "band" else float(value)

    @property
    def tau(self) -> float | None:
        """Decision threshold tau on calibrated p among exits (None in prediction-set mode)."""
        value = self.params["thresholds"].get("tau")
        return None if value is None else float(value)

    def calibrate(self, p_raw, gate_raw) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated p(roadwork) and selection score g, both shape (N,)."""
        p = self.cls_scaler.transform(np.asarray(p_raw, dtype=float))
        if self.gate_score == "softmax_response":
            return p, softmax_response(p)
        return p, self.gate_scaler.transform(np.asarray(gate_raw, dtype=float))

    def decide(self, p_raw, gate_raw) -> np.ndarray:
        """Decisions, shape (N,), each "roadwork", "no_roadwork" or "defer"."""
        p, g = self.calibrate(p_raw, gate_raw)
        thresholds = self.params["thresholds"]
        return _decide(
            {
                "method": self.params.get("method"),
                "rule": self.rule,
                "b": thresholds.get("b"),
                "lam": thresholds.get("lambda"),
                "tau": thresholds.get("tau"),
                "set_thresholds": thresholds.get("sets"),
            },
            p,
            g,
        )
