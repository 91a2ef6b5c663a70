"""Stage-1 rules (gate, band, sets) behind one registry: a rule holds its thresholds and decides; its class
certifies thresholds on val_calib with one of its methods (``certify.py``).

- ``gate``: exit iff the selection score g >= lambda; on exit roadwork iff p >= tau (methods scrc, crc).
- ``band``: no_roadwork iff p < tau, roadwork iff p >= b, defer iff tau <= p < b; g plays no role (method scrc).
- ``sets``: class-conditional conformal sets {0, 1}: roadwork in the set iff p >= t_roadwork, no_roadwork iff
  1 - p >= t_no_roadwork; singletons exit, empty or full sets defer (method sets).

The ``thresholds`` block of scrc_params.json names its rule (``rule``); a block without one is a gate rule.

Example:
    >>> outcome = rule_class("gate").certify("scrc", p, g, y, grid, Targets(alpha=0.02, delta=0.1, xi=0.8))
    >>> outcome.rule.decide(p_test, g_test)
    >>> create_rule("band", tau=0.1, b=0.9).decide(p_test, g_test)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from roadwork_cli.calibration.certify import conformal_sets, crc_gate, exit_pair_table, scan_and_pick
from roadwork_cli.calibration.grids import (
    band_grid_from_scores,
    fixed_band_grid,
    fixed_gate_grid,
    gate_grid_from_scores,
)
from roadwork_cli.calibration.groups import GroupIndex, fixed_sequence_prefix
from roadwork_cli.calibration.stats import dkw_slack
from roadwork_cli.calibration.targets import CalibrationOutcome, Targets, create_method
from roadwork_cli.errors import UsageError
from roadwork_cli.registry import Registry

Certifier = Callable[..., CalibrationOutcome]
"""``certifier(rule_cls, p, g, y, grid, targets) -> CalibrationOutcome`` (``certify.py``)."""


@dataclass(frozen=True)
class Rule:
    """A stage-1 rule with its thresholds; each concrete rule is registered in ``RULES`` under its ``name``."""

    name: ClassVar[str]
    description: ClassVar[str]
    certifiers: ClassVar[dict[str, Certifier]]
    uses_selection_score: ClassVar[bool] = False

    def decide(self, p, g) -> np.ndarray:
        """Decisions, shape (N,), each "roadwork", "no_roadwork" or "defer", from calibrated p and selection g."""
        raise NotImplementedError

    def to_params(self) -> dict[str, Any]:
        """The ``thresholds`` block of scrc_params.json (every rule writes every key; unused ones are null)."""
        return {"rule": self.name, "lambda": None, "tau": None, "b": None, "sets": None}

    def describe(self, selection_score: str = "g") -> str:
        """The rule with its thresholds in words (4 significant digits)."""
        raise NotImplementedError

    def set_sizes(self, p, g) -> np.ndarray:
        """Prediction-set size per image, shape (N,): an exit is a singleton, a deferral the full set {0, 1}."""
        return np.where(self.decide(p, g) == "defer", 2, 1)

    @classmethod
    def from_params(cls, thresholds: dict[str, Any]) -> Rule:
        raise NotImplementedError

    @classmethod
    def check_method(cls, method: str) -> None:
        """Raise UsageError unless ``method`` is one of ``cls.certifiers``."""
        if method not in cls.certifiers:
            raise UsageError(
                f"calibration.rule={cls.name} is certified by method={' or method='.join(cls.certifiers)} only "
                f"(not {method})."
            )

    @classmethod
    def certify(
        cls, method: str, p, g, y, grid, targets: Targets, groups: GroupIndex | None = None
    ) -> CalibrationOutcome:
        """Choose thresholds on val_calib with ``method`` (one of ``cls.certifiers``); ``groups``: which images belong
        together (clips, near-duplicates), so that the guarantee counts groups, not images, as independent draws."""
        cls.check_method(method)
        return cls.certifiers[method](cls, p, g, y, grid, targets, groups)

    @classmethod
    def make_grid(cls, p_select, g_select, y_select, grid_size: int, xi_reach: float, alpha: float,
                  score_range: tuple[float, float]) -> np.ndarray:  # fmt: skip
        """The grid, fixed from val_select (or data-free) before val_calib is seen; empty when the rule has none."""
        return np.array([])

    @classmethod
    def coverage_slack(cls, n: int, delta1: float, grid_size: int) -> float:
        """DKW slack the coverage of the chosen thresholds must clear."""
        return 0.0


@dataclass(frozen=True)
class ScanRule(Rule):
    """A rule with one grid threshold and tau, certified by ``scan_and_pick``."""

    grid_name: ClassVar[str]
    what: ClassVar[str]
    note: ClassVar[str] = ""
    # Ties of the infeasible fallback (same coverage and objective) go to the larger tau (band: tau = b, the empty
    # band) or the smaller one (gate: fewer roadwork calls).
    fallback_larger_tau: ClassVar[bool] = False

    @classmethod
    def pair_table(cls, p, g, y, value: float, all_taus: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(taus scanned at this grid value, their pair table with k, m, tp, tn, fp, n_exit per tau)."""
        raise NotImplementedError

    @classmethod
    def from_grid_and_tau(cls, value: float, tau: float) -> ScanRule:
        raise NotImplementedError

    @classmethod
    def positive_entry(cls, p, g, y, value: float) -> np.ndarray:
        """(n,) the tau above which each image is an exited positive at this grid value (-inf: always; inf: never)."""
        raise NotImplementedError

    @classmethod
    def group_coverage_ok(cls, pvalues: list[np.ndarray], delta1: float) -> list[np.ndarray]:
        """Per grid value, (T,) whether the group-level coverage test passes: ``pvalues`` of H0 "exit rate < xi" per
        pair, tested in a fixed sequence that follows the exit rate downwards."""
        raise NotImplementedError


@dataclass(frozen=True)
class GateRule(ScanRule):
    """Exit iff the selection score g >= lambda; on exit roadwork iff p >= tau."""

    lam: float | None = None  # None: everything exits
    tau: float = 0.5

    name: ClassVar[str] = "gate"
    description: ClassVar[str] = "exit iff selection score g >= lambda, then roadwork iff p >= tau"
    grid_name: ClassVar[str] = "lambda"
    what: ClassVar[str] = "gate threshold"
    uses_selection_score: ClassVar[bool] = True

    def describe(self, selection_score: str = "g") -> str:
        gate = "everything exits" if self.lam is None else f"exit iff {selection_score} >= {self.lam:.4g}"
        return f"gate: {gate}, then roadwork iff p >= {self.tau:.4g}"

    def decide(self, p, g) -> np.ndarray:
        p, g = np.asarray(p, dtype=float), np.asarray(g, dtype=float)
        lam = -np.inf if self.lam is None else self.lam
        return np.where(g >= lam, np.where(p >= self.tau, "roadwork", "no_roadwork"), "defer").astype(str)

    def to_params(self) -> dict[str, Any]:
        return {**super().to_params(), "lambda": _finite_or_none(self.lam), "tau": self.tau}

    @classmethod
    def from_params(cls, thresholds: dict[str, Any]) -> GateRule:
        if thresholds.get("tau") is None:
            raise UsageError("Gate-rule calibration parameters need threshold 'tau'; re-run `roadwork calibrate`.")
        lam = thresholds.get("lambda")
        return cls(lam=None if lam is None else float(lam), tau=float(thresholds["tau"]))

    @classmethod
    def from_grid_and_tau(cls, value: float, tau: float) -> GateRule:
        return cls(lam=value, tau=tau)

    @classmethod
    def pair_table(cls, p, g, y, value: float, all_taus: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return all_taus, exit_pair_table(p, y, g >= value, all_taus)

    @classmethod
    def make_grid(cls, p_select, g_select, y_select, grid_size: int, xi_reach: float, alpha: float,
                  score_range: tuple[float, float]) -> np.ndarray:  # fmt: skip
        if g_select is not None and np.asarray(g_select).size:
            return gate_grid_from_scores(g_select, grid_size, 0.0, max(1.0 - xi_reach, 0.0))
        return fixed_gate_grid(grid_size, *score_range)

    @classmethod
    def coverage_slack(cls, n: int, delta1: float, grid_size: int) -> float:
        return dkw_slack(n, delta1)  # the exit rate's DKW bound is uniform over lambda already

    @classmethod
    def positive_entry(cls, p, g, y, value: float) -> np.ndarray:
        return np.where((np.asarray(g) >= value) & (np.asarray(y) == 1), -np.inf, np.inf)

    @classmethod
    def group_coverage_ok(cls, pvalues: list[np.ndarray], delta1: float) -> list[np.ndarray]:
        # The exit rate does not depend on tau and falls as lambda rises: one fixed sequence up the sorted grid.
        passed = fixed_sequence_prefix(np.array([pv[0] for pv in pvalues]), delta1)
        return [np.full(pv.shape, i < passed) for i, pv in enumerate(pvalues)]


@dataclass(frozen=True)
class BandRule(ScanRule):
    """no_roadwork iff p < tau, roadwork iff p >= b, defer iff tau <= p < b (the selection score plays no role)."""

    tau: float = 0.5
    b: float = 0.5

    name: ClassVar[str] = "band"
    description: ClassVar[str] = "no_roadwork iff p < tau, roadwork iff p >= b, defer in between"
    grid_name: ClassVar[str] = "b"
    what: ClassVar[str] = "band (b, tau)"
    note: ClassVar[str] = "Band rule: exit iff p < tau or p >= b; the selection score plays no role in the decisions."
    fallback_larger_tau: ClassVar[bool] = True

    def describe(self, selection_score: str = "g") -> str:
        return f"band: no_roadwork iff p < {self.tau:.4g}, roadwork iff p >= {self.b:.4g}, defer in between"

    def decide(self, p, g) -> np.ndarray:
        p = np.asarray(p, dtype=float)
        # p < tau wins over p >= b, though calibration only ever picks tau <= b.
        return np.where(p < self.tau, "no_roadwork", np.where(p >= self.b, "roadwork", "defer")).astype(str)

    def to_params(self) -> dict[str, Any]:
        return {**super().to_params(), "tau": self.tau, "b": self.b}

    @classmethod
    def from_params(cls, thresholds: dict[str, Any]) -> BandRule:
        if thresholds.get("b") is None or thresholds.get("tau") is None:
            raise UsageError("Band-rule calibration parameters need thresholds 'b' and 'tau'; re-run calibrate.")
        return cls(tau=float(thresholds["tau"]), b=float(thresholds["b"]))

    @classmethod
    def from_grid_and_tau(cls, value: float, tau: float) -> BandRule:
        return cls(tau=tau, b=value)

    @classmethod
    def pair_table(cls, p, g, y, value: float, all_taus: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        taus = np.append(all_taus[all_taus < value], value)  # tau = b: the band is empty, everything exits
        below = exit_pair_table(p, y, np.ones(p.shape, dtype=bool), taus)  # k, tn: the p < tau part of the exits
        upper = p >= value
        tp, fp = int(np.sum(upper & (y == 1))), int(np.sum(upper & (y == 0)))
        k, tn = below["k"], below["tn"]
        return taus, {"k": k, "tp": np.full(taus.shape, tp), "tn": tn, "fp": np.full(taus.shape, fp),
                      "m": k + tp, "n_exit": k + tn + tp + fp}  # fmt: skip

    @classmethod
    def make_grid(cls, p_select, g_select, y_select, grid_size: int, xi_reach: float, alpha: float,
                  score_range: tuple[float, float]) -> np.ndarray:  # fmt: skip
        if p_select is not None and np.asarray(p_select).size:
            return band_grid_from_scores(p_select, y_select, grid_size, xi_reach, alpha)
        return fixed_band_grid(grid_size)

    @classmethod
    def coverage_slack(cls, n: int, delta1: float, grid_size: int) -> float:
        return dkw_slack(n, delta1 / grid_size)  # uniform in tau per b, Bonferroni over the b grid

    @classmethod
    def positive_entry(cls, p, g, y, value: float) -> np.ndarray:
        p, y = np.asarray(p, dtype=float), np.asarray(y)
        # A positive at or above b always exits (as roadwork); one below b exits (as a miss) once tau passes its p.
        return np.where(y == 1, np.where(p >= value, -np.inf, p), np.inf)

    @classmethod
    def group_coverage_ok(cls, pvalues: list[np.ndarray], delta1: float) -> list[np.ndarray]:
        # Per b the band [tau, b) narrows as tau rises, so the exit rate grows with tau: a fixed sequence down from
        # tau = b, at delta1 / |B| (Bonferroni over the b grid).
        out = []
        for pv in pvalues:
            passed = fixed_sequence_prefix(pv[::-1], delta1 / len(pvalues))
            ok = np.zeros(pv.shape, dtype=bool)
            ok[pv.size - passed :] = True
            out.append(ok)
        return out


@dataclass(frozen=True)
class SetsRule(Rule):
    """Conformal prediction sets: singletons exit with their class; empty or full sets defer."""

    t_roadwork: float = 0.5
    t_no_roadwork: float = 0.5

    name: ClassVar[str] = "sets"
    description: ClassVar[str] = "class-conditional conformal sets; a singleton exits, size 0 or 2 defers"

    def sets(self, p) -> np.ndarray:
        """Membership matrix (N, 2): class 1 included iff p >= t_roadwork, class 0 iff 1 - p >= t_no_roadwork."""
        p = np.asarray(p, dtype=float)
        return np.stack([(1.0 - p) >= self.t_no_roadwork, p >= self.t_roadwork], axis=1)

    def describe(self, selection_score: str = "g") -> str:
        return (f"prediction sets: roadwork in the set iff p >= {self.t_roadwork:.4g}, no_roadwork iff "
                f"1 - p >= {self.t_no_roadwork:.4g}; a set of one class exits")  # fmt: skip

    def set_sizes(self, p, g) -> np.ndarray:
        return self.sets(p).sum(axis=1)

    def decide(self, p, g) -> np.ndarray:
        sets = self.sets(p)  # (N, 2)
        out = np.full(sets.shape[0], "defer", dtype=object)
        out[sets[:, 1] & ~sets[:, 0]] = "roadwork"
        out[sets[:, 0] & ~sets[:, 1]] = "no_roadwork"
        return out.astype(str)

    def to_params(self) -> dict[str, Any]:
        return {**super().to_params(), "sets": {"roadwork": self.t_roadwork, "no_roadwork": self.t_no_roadwork}}

    @classmethod
    def from_params(cls, thresholds: dict[str, Any]) -> SetsRule:
        sets = thresholds.get("sets") or {}
        if sets.get("roadwork") is None or sets.get("no_roadwork") is None:
            raise UsageError("Prediction-set parameters need thresholds.sets.roadwork and .no_roadwork; re-run.")
        return cls(t_roadwork=float(sets["roadwork"]), t_no_roadwork=float(sets["no_roadwork"]))


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


GateRule.certifiers = {"scrc": scan_and_pick, "crc": crc_gate}
BandRule.certifiers = {"scrc": scan_and_pick}
SetsRule.certifiers = {"sets": conformal_sets}


# ----------------------------------------------------------------------------------------------------- registry
RULES: Registry[type[Rule]] = Registry("decision rule")
for _rule in (GateRule, BandRule, SetsRule):
    RULES.add(_rule.name, _rule, _rule.description)


def list_rules() -> list[str]:
    """Names of the stage-1 rules."""
    return RULES.names()


def rule_class(name: str) -> type[Rule]:
    """The rule class registered as ``name`` (what certifies thresholds; ``create_rule`` builds one with them).

    Raises:
        UnknownNameError: No such rule.
    """
    return RULES.get(name)


def create_rule(name: str, **thresholds: Any) -> Rule:
    """A rule ``name`` with the given thresholds, e.g. ``create_rule("gate", lam=0.3, tau=0.5)``."""
    return rule_class(name)(**thresholds)


def rule_for(method: str, rule: str) -> type[Rule]:
    """The rule class a method certifies: the method's own rule if it implies one, else ``rule``."""
    return rule_class(create_method(method).rule or rule)


def rule_from_params(params: dict[str, Any]) -> Rule:
    """The rule of a scrc_params dict (its ``thresholds`` block; without ``rule`` it is a gate rule)."""
    thresholds = params["thresholds"]
    return rule_class(thresholds.get("rule") or "gate").from_params(thresholds)


__all__ = [
    "RULES",
    "BandRule",
    "GateRule",
    "Rule",
    "ScanRule",
    "SetsRule",
    "create_rule",
    "list_rules",
    "rule_class",
    "rule_for",
    "rule_from_params",
]
