"""``SelectiveConformal``: the one calibration estimator, fit -> conformalize -> predict -> save / load (MAPIE's shape).

- ``fit`` fits probability scaling of p and of the gate on val_select, chooses the selection score and fixes the
  threshold grid there, all before val_calib is seen;
- ``conformalize`` certifies the rule's thresholds on val_calib (``rules.py`` / ``certify.py``) and builds the
  ``scrc_params.json`` dict;
- ``predict`` turns raw scores into decisions: calibrate, evaluate, predict and export all go through it;
- ``save`` writes ``scaling.json`` and ``scrc_params.json`` (which embeds a copy of the scaling, so it alone suffices);
  ``load`` / ``from_dicts`` read them back (params files of version 1).

An infeasible calibration defers every image unless its params say ``infeasible_decisions: fallback``; a params file
without that key defers (the safe choice).

Example:
    >>> est = SelectiveConformal(settings.calibration).fit(p_select, gate_select, y_select, n_calib=len(y_calib))
    >>> outcome = est.conformalize(p_calib, gate_calib, y_calib)
    >>> est.save(run.scrc_params, run.scaling)
    >>> SelectiveConformal.load(run.scaling, run.scrc_params).predict(p_raw, gate_raw)  # roadwork/no_roadwork/defer
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork_cli.calibration.groups import GroupIndex
from roadwork_cli.calibration.rules import Rule, rule_for, rule_from_params
from roadwork_cli.calibration.scaling import Scaler, create_scaler, fit_gate_scaler, scaler_from_dict, softmax_response
from roadwork_cli.calibration.targets import CalibrationOutcome, Targets, create_method
from roadwork_cli.config import CalibrationSettings
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_write_json, read_json
from roadwork_cli.metrics.selective import aurc

PARAMS_VERSION = 1
GATE_SCORES = ("gate", "softmax_response")


def _identity_scaling(gate_score: str) -> dict[str, Any]:
    return {"cls": {"method": "none", "params": {}}, "gate": {"method": "none", "params": {}}, "gate_score": gate_score}


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


def is_certified(params: dict[str, Any]) -> bool:
    """Whether the calibration in ``params`` (``scrc_params.json``) certified its targets with probability >= 1 - delta.

    The recorded certificate decides; a file that records none counts as certified when feasible under a
    high-probability method (SCRC-I), never under CRC, whose bound holds in expectation only.
    """
    stated = (params.get("certified") or {}).get("targets")
    if stated is not None:
        return bool(stated)
    return bool(params.get("feasible", True)) and create_method(str(params.get("method") or "scrc")).high_probability


def defers_everything(params: dict[str, Any]) -> bool:
    """An infeasible calibration defers every image unless its params ask for the fallback thresholds."""
    return not params.get("feasible", True) and params.get("infeasible_decisions", "defer") != "fallback"


class SelectiveConformal:
    """Scaling of p and of the gate, the selection score, and the certified rule with its thresholds.

    Args:
        settings: What to certify and how (``CalibrationSettings``); needed by ``fit`` and ``conformalize`` only, so
            an estimator loaded from files has none.

    Attributes:
        cls_scaler: Maps raw p(roadwork) to calibrated p.
        gate_scaler: Maps the raw gate to a calibrated P(decision right) (unused with softmax_response).
        gate_score: "gate" or "softmax_response" (max(p, 1 - p) of the calibrated p).
        scaling: The ``scaling.json`` dict of the two scalers and the selection score.
        grid_: The rule's threshold grid, fixed by ``fit``.
        outcome_: What ``conformalize`` chose (None for a loaded estimator).
        params: The scrc_params dict (thresholds, targets, certified bounds); None before ``conformalize``.
        decision_rule: The rule object built from ``params["thresholds"]``.
    """

    def __init__(self, settings: CalibrationSettings | None = None):
        self.settings = settings
        self.scaling: dict[str, Any] = _identity_scaling("gate")
        self.cls_scaler: Scaler = scaler_from_dict(None)
        self.gate_scaler: Scaler = scaler_from_dict(None)
        self.gate_score = "gate"
        self.grid_: np.ndarray | None = None
        self.outcome_: CalibrationOutcome | None = None
        self.params: dict[str, Any] | None = None
        self.decision_rule: Rule | None = None
        if settings is not None:
            self.targets = Targets(
                settings.fnr, settings.delta, settings.coverage, settings.delta_coverage_share, settings.objective
            )
            self.rule_cls = rule_for(settings.method, settings.rule)
            self.rule_cls.check_method(settings.method)

    # ------------------------------------------------------------------------------------------------- fitting
    def _settings(self) -> CalibrationSettings:
        if self.settings is None:
            raise RuntimeError("a loaded SelectiveConformal has no settings to fit with; build one from settings")
        return self.settings

    def _set_scaling(self, scaling: dict[str, Any]) -> None:
        try:
            self.cls_scaler = scaler_from_dict(scaling.get("cls"))
            self.gate_scaler = scaler_from_dict(scaling.get("gate"))
        except (TypeError, ValueError, UsageError) as exc:
            raise UsageError(f"Bad scaling parameters: {exc}") from None
        self.gate_score = str(scaling.get("gate_score") or "gate")
        if self.gate_score not in GATE_SCORES:
            raise UsageError(f"Unknown gate_score {self.gate_score!r}; expected 'gate' or 'softmax_response'.")
        self.scaling = scaling

    def fit(self, p_select=None, gate_select=None, y_select=None, n_calib: int | None = None) -> SelectiveConformal:
        """Fit scaling and the selection score on val_select and fix the threshold grid, before val_calib is seen.

        Args:
            p_select: Raw p(roadwork) on val_select, shape (n,); None (or empty): no scaling and a data-free grid
                evenly spaced on the selection score's range.
            gate_select: Raw gate scores on val_select, shape (n,).
            y_select: Labels on val_select, shape (n,).
            n_calib: Number of val_calib images (a count, not data): the grid then reaches xi + the DKW slack, so
                every grid point can clear the coverage bound.
        """
        settings = self._settings()
        if p_select is None or np.asarray(p_select).size == 0:
            gate_score = "gate" if settings.gate_score == "auto" else settings.gate_score
            self._set_scaling(_identity_scaling(gate_score))
            score_range = (0.5, 1.0) if gate_score == "softmax_response" else (0.0, 1.0)
            t = self.targets
            self.grid_ = self.rule_cls.make_grid(None, None, None, settings.grid_size, t.xi, t.alpha, score_range)
            return self
        p_raw, gate_raw = np.asarray(p_select, dtype=float), np.asarray(gate_select, dtype=float)
        labels = np.asarray(y_select).astype(int)
        cls_scaler = create_scaler(settings.scaling).fit(p_raw, labels)
        p = cls_scaler.transform(p_raw)
        gate_scaler = fit_gate_scaler(settings.gate_scaling, gate_raw, p, labels)
        scaling = {"cls": cls_scaler.to_dict(), "gate": gate_scaler.to_dict(), "gate_score": settings.gate_score}
        if settings.gate_score == "auto":
            scaling.update(choose_selection_score(p, gate_scaler.transform(gate_raw), labels, alpha=settings.fnr))
        self._set_scaling(scaling)
        p, g = self.calibrate(p_raw, gate_raw)
        # The grid may use n (a count, not data) so that it reaches just inside the DKW-feasible region.
        t = self.targets
        slack = self.rule_cls.coverage_slack(n_calib, t.delta1, settings.grid_size) if n_calib else 0.0
        self.grid_ = self.rule_cls.make_grid(
            p, g, labels, settings.grid_size, min(t.xi + slack, 1.0), t.alpha, (0.0, 1.0)
        )  # fmt: skip
        return self

    def conformalize(
        self, p_calib, gate_calib, y_calib, data: dict[str, Any] | None = None, groups=None
    ) -> CalibrationOutcome:
        """Certify the rule's thresholds on val_calib (raw scores) and build the scrc_params dict.

        Args:
            p_calib: Raw p(roadwork) on val_calib, shape (n,).
            gate_calib: Raw gate scores on val_calib, shape (n,).
            y_calib: Labels on val_calib, shape (n,).
            data: What the scores were (paths, counts, fingerprints), recorded as the params' ``data`` block.
            groups: Group label of every val_calib sample (clip id, near-duplicate cluster; None or "" alone), or
                None. Where a group holds more than one image the guarantee counts groups as the independent draws.
        """
        settings = self._settings()
        if self.grid_ is None:
            self.fit(n_calib=len(np.asarray(y_calib)))
        p, g = self.calibrate(p_calib, gate_calib)
        index = None if groups is None else GroupIndex.from_labels(groups)
        self.outcome_ = self.rule_cls.certify(settings.method, p, g, y_calib, self.grid_, self.targets, index)
        self.params = self._params_dict(self.outcome_, data or {})
        self.decision_rule = self.outcome_.rule
        return self.outcome_

    def _params_dict(self, outcome: CalibrationOutcome, data: dict[str, Any]) -> dict[str, Any]:
        from roadwork_cli.version import __version__

        settings = self._settings()
        record = outcome.to_dict()
        return {
            "version": PARAMS_VERSION,
            "library_version": __version__,
            "method": outcome.method,
            "gate_score": self.gate_score,
            "feasible": bool(outcome.feasible),
            "infeasible_decisions": settings.infeasible_decisions,
            # Whether an infeasible outcome was asked to pass (exit 0) or not (exit 3): export's refusal names which.
            "allow_infeasible": bool(settings.allow_infeasible),
            "thresholds": record["thresholds"],
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
            # The unit of independence the guarantee counts: images, or groups (clips, near-duplicate clusters).
            "unit": outcome.unit,
            "n_groups": outcome.n_groups,
            "largest_group": outcome.largest_group,
            # Only "FNR <= alpha" is certified; the CP bound at the chosen tau is pointwise (tau was picked on data).
            "certified": {
                "targets": outcome.certified,
                "fnr_at_most": outcome.alpha if outcome.certified else None,
                "fnr_upper_pointwise": record["fnr_upper_pointwise"],
                "coverage_lower": record["coverage_lower"],
                "pairs": outcome.certified_pairs,
            },
            "empirical": {
                "coverage": record["coverage"],
                "fnr": record["fnr"],
                "accuracy_on_exits": record["accuracy_on_exits"],
                "exited_positives": outcome.exited_positives,
                "misses": outcome.misses,
            },
            "attainable": record["attainable"],
            "grid": record["grid"],
            "per_grid": record["per_grid"],
            "note": outcome.note,
            "scaling": self.scaling,
            "data": data,
        }

    # ---------------------------------------------------------------------------------------------- save / load
    def save(self, params_path: str | Path, scaling_path: str | Path | None = None) -> None:
        """Write ``scrc_params.json`` (scaling embedded) and, when given, ``scaling.json`` (atomically)."""
        if self.params is None:
            raise RuntimeError("call conformalize() before save()")
        if scaling_path is not None:
            atomic_write_json(scaling_path, self.scaling)
        atomic_write_json(params_path, self.params)

    @classmethod
    def from_dicts(cls, scaling: dict[str, Any] | None, params: dict[str, Any]) -> SelectiveConformal:
        """Build from the parsed JSON; ``scaling=None`` uses the copy embedded in ``params`` (or no scaling)."""
        if not isinstance(params, dict) or not isinstance(params.get("thresholds"), dict):
            raise UsageError("Calibration parameters lack 'thresholds'; re-run `roadwork calibrate`.")
        scaling = dict(scaling if scaling is not None else params.get("scaling") or {})
        scaling["gate_score"] = scaling.get("gate_score") or params.get("gate_score") or "gate"
        estimator = cls()
        estimator._set_scaling(scaling)
        estimator.params = params
        estimator.decision_rule = rule_from_params(params)
        return estimator

    @classmethod
    def load(cls, scaling_path: str | Path | None, params_path: str | Path) -> SelectiveConformal:
        """Read ``scaling.json`` (optional) and ``scrc_params.json``."""
        try:
            params = read_json(params_path)
            scaling = read_json(scaling_path) if scaling_path is not None else None
        except FileNotFoundError as exc:
            raise UsageError(f"{exc.filename} does not exist; run `roadwork calibrate` first.") from None
        except ValueError as exc:
            raise UsageError(f"Calibration file is not valid JSON: {exc}") from None
        return cls.from_dicts(scaling, params)

    # ------------------------------------------------------------------------------------------------ predicting
    def _fitted(self) -> tuple[Rule, dict[str, Any]]:
        if self.decision_rule is None or self.params is None:
            raise RuntimeError("call conformalize() (or load()) before predicting")
        return self.decision_rule, self.params

    @property
    def rule(self) -> str:
        """ "gate", "band" or "sets"."""
        return self._fitted()[0].name

    @property
    def lam(self) -> float | None:
        """Gate threshold lambda (None = everything exits, or not the gate rule)."""
        return getattr(self._fitted()[0], "lam", None)

    @property
    def tau(self) -> float | None:
        """Decision threshold tau on calibrated p (None for prediction sets)."""
        return getattr(self._fitted()[0], "tau", None)

    @property
    def b(self) -> float | None:
        """Upper threshold of the band rule: roadwork iff p >= b (None for other rules)."""
        return getattr(self._fitted()[0], "b", None)

    @property
    def feasible(self) -> bool:
        """Whether calibration met its targets (files without the key are taken as feasible)."""
        return bool(self._fitted()[1].get("feasible", True))

    @property
    def certified(self) -> bool:
        """Whether calibration certified the targets with probability >= 1 - delta (:func:`is_certified`)."""
        return is_certified(self._fitted()[1])

    @property
    def defers_everything(self) -> bool:
        """Whether this rule defers every image (:func:`defers_everything`)."""
        return defers_everything(self._fitted()[1])

    def calibrate(self, p_raw, gate_raw) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated p(roadwork) and selection score g, both shape (N,)."""
        p = self.cls_scaler.transform(np.asarray(p_raw, dtype=float))
        if self.gate_score == "softmax_response":
            return p, softmax_response(p)
        return p, self.gate_scaler.transform(np.asarray(gate_raw, dtype=float))

    def set_sizes(self, p_raw, gate_raw) -> np.ndarray:
        """Prediction-set size per image, shape (N,) (2 = deferred)."""
        rule, _ = self._fitted()
        p, g = self.calibrate(p_raw, gate_raw)
        if self.defers_everything:
            return np.full(p.shape, 2)
        return rule.set_sizes(p, g)

    def describe(self) -> str:
        """The rule with its thresholds in words."""
        return self._fitted()[0].describe(self.gate_score)

    def predict(self, p_raw, gate_raw) -> np.ndarray:
        """Decisions for raw scores, shape (N,), each "roadwork", "no_roadwork" or "defer"."""
        rule, _ = self._fitted()
        p, g = self.calibrate(p_raw, gate_raw)
        if self.defers_everything:
            return np.full(p.shape, "defer").astype(str)
        return rule.decide(p, g)


__all__ = ["PARAMS_VERSION", "SelectiveConformal", "choose_selection_score", "defers_everything", "is_certified"]
