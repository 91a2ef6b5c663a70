"""Stage-1 rules (gate, band, sets) and the methods that certify them, behind one registry.

A rule holds its thresholds and decides; its class certifies thresholds on val_calib with a method:

- ``gate``: exit iff the selection score g >= lambda; on exit roadwork iff p >= tau (methods scrc, crc).
- ``band``: no_roadwork iff p < tau, roadwork iff p >= b, defer iff tau <= p < b; g plays no role (method scrc).
- ``sets``: class-conditional conformal sets {0, 1}: roadwork in the set iff p >= t_roadwork, no_roadwork iff
  1 - p >= t_no_roadwork; singletons exit, empty or full sets defer (method sets).

SCRC-I (method ``scrc``, a Learn-then-Test-style adaptation; see docs/architecture.md) for the gate and band rules
is one scan-and-pick driver over a grid fixed before val_calib (lambda for gate, b for band). With probability at
least 1 - delta1 - delta2 over the n val_calib images the chosen pair has FNR_on_exits <= alpha AND
coverage >= xi:

1. Coverage (one-sided DKW/Massart, needs delta1 <= 1/2): keep pairs whose empirical exit rate is at least
   xi + slack. For gate the exit rate does not depend on tau and the bound is uniform over lambda at delta1; for
   band the deferred mass P(tau <= p < b) is one survival function in tau per b, so the bound is uniform in tau at
   delta1 / |B| (Bonferroni over B).
2. Risk: at one grid value the m(tau) exited positives and the k(tau) of them with p < tau give the exact binomial
   p-value P(Bin(m, alpha) <= k) of H0: FNR > alpha. FNR grows with tau, so tau is scanned upwards as a fixed
   sequence stopping at the first p-value above delta2 / |grid| (Bonferroni over the grid).
3. Among certified pairs the objective (accuracy | coverage | mcc on exits, then coverage, then the smaller tau)
   picks one. Only "FNR <= alpha" is certified: the Clopper-Pearson bound reported at the chosen tau is pointwise
   (tau was picked after looking at the data) and is labelled ``fnr_upper_pointwise``.
4. Infeasible targets: the fallback is the certified pair with the largest coverage (or the last grid value with
   tau = 0), and ``attainable`` reports the best certifiable FNR bound at coverage xi and the largest certified
   coverage at FNR alpha.

Example:
    >>> rule_cls = create_rule("gate")
    >>> outcome = rule_cls.certify("scrc", p, g, y, grid, Targets(alpha=0.02, delta=0.1, xi=0.8))
    >>> outcome.rule.decide(p_test, g_test)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from roadwork_cli.calibration.grids import (
    band_grid_from_scores,
    fixed_band_grid,
    fixed_gate_grid,
    gate_grid_from_scores,
    tau_candidates,
)
from roadwork_cli.calibration.stats import binomial_pvalue, check_delta_split, clopper_pearson_upper, dkw_slack
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import json_safe

OBJECTIVES = ("accuracy", "coverage", "mcc")


# ------------------------------------------------------------------------------------------------------- risks
@dataclass(frozen=True)
class FNROnExits:
    """Missed roadwork among exited positives (the controlled risk)."""

    name: ClassVar[str] = "fnr_on_exits"

    @staticmethod
    def counts(labels, predictions, exits) -> tuple[int, int]:
        """(misses k, exited positives m)."""
        labels, predictions, exits = np.asarray(labels), np.asarray(predictions), np.asarray(exits, dtype=bool)
        positives = exits & (labels == 1)
        return int(np.sum(positives & (predictions == 0))), int(positives.sum())

    def empirical(self, labels, predictions, exits) -> float:
        k, m = self.counts(labels, predictions, exits)
        return k / m if m else float("nan")


@dataclass(frozen=True)
class Coverage:
    """Fraction of images that exit stage 1 (the constrained rate)."""

    name: ClassVar[str] = "coverage"

    @staticmethod
    def empirical(exits) -> float:
        exits = np.asarray(exits, dtype=bool)
        return float(exits.mean()) if exits.size else float("nan")


# ------------------------------------------------------------------------------------------- targets / outcome
@dataclass(frozen=True)
class Targets:
    """What calibration must certify, and how to choose among certified thresholds.

    Raises:
        UsageError: delta1 = delta_coverage_share * delta > 1/2 (the one-sided DKW constant needs delta1 <= 1/2).
    """

    alpha: float
    delta: float
    xi: float
    delta_coverage_share: float = 0.5
    objective: str = "accuracy"

    def __post_init__(self) -> None:
        check_delta_split(self.delta, self.delta_coverage_share)
        if self.objective not in OBJECTIVES:
            raise UsageError(f"Unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")

    @property
    def delta1(self) -> float:
        """Failure probability spent on the coverage bound."""
        return check_delta_split(self.delta, self.delta_coverage_share)[0]

    @property
    def delta2(self) -> float:
        """Failure probability spent on the risk tests."""
        return check_delta_split(self.delta, self.delta_coverage_share)[1]


@dataclass
class CalibrationOutcome:
    """Chosen rule (with its thresholds) and everything needed to audit it (serialised into scrc_params.json)."""

    method: str
    feasible: bool
    rule: Rule
    alpha: float
    delta: float
    xi: float
    n: int
    n_pos: int
    delta1: float = 0.0
    delta2: float = 0.0
    grid: list[float] = field(default_factory=list)
    coverage: float = float("nan")
    coverage_lower: float | None = None
    fnr: float = float("nan")
    fnr_upper_pointwise: float | None = None
    accuracy_on_exits: float = float("nan")
    exited_positives: int = 0
    misses: int = 0
    certified_pairs: int = 0
    attainable: dict[str, float | None] = field(default_factory=dict)
    per_grid: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    @property
    def thresholds(self) -> dict[str, Any]:
        """The rule's thresholds as written to scrc_params.json."""
        return self.rule.to_params()

    @property
    def certified(self) -> bool:
        """True when the targets hold with probability >= 1 - delta (a feasible high-probability method)."""
        return bool(self.feasible and create_method(self.method).high_probability)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: NaN/inf become None (the grid's -inf is written as null = 'everything exits')."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rule"}
        return json_safe({**data, "thresholds": self.thresholds, "certified": self.certified})


# ------------------------------------------------------------------------------------------------- shared scan
def _pair_table(p: np.ndarray, y: np.ndarray, exits: np.ndarray, taus: np.ndarray) -> dict[str, np.ndarray]:
    """Counts for every tau with fixed exits: misses k, false alarms, correct exits; vectorised with searchsorted."""
    pos = np.sort(p[exits & (y == 1)])
    neg = np.sort(p[exits & (y == 0)])
    k = np.searchsorted(pos, taus, side="left")  # positives with p < tau: misses
    tn = np.searchsorted(neg, taus, side="left")  # negatives with p < tau: correct no_roadwork
    return {"k": k, "tp": pos.size - k, "tn": tn, "fp": neg.size - tn, "m": np.full(taus.shape, pos.size),
            "n_exit": np.full(taus.shape, pos.size + neg.size)}  # fmt: skip


def _objective_values(table: dict[str, np.ndarray], objective: str, n: int) -> np.ndarray:
    n_exit = table["n_exit"].astype(float)
    tp, tn, fp, fn = (table[key].astype(float) for key in ("tp", "tn", "fp", "k"))
    with np.errstate(invalid="ignore", divide="ignore"):
        if objective == "accuracy":
            values = (tp + tn) / n_exit
        elif objective == "coverage":
            values = n_exit / n
        else:  # mcc (Targets only admits OBJECTIVES)
            denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            values = np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)
    return np.where(n_exit > 0, values, -np.inf)


def _certified_prefix(k, m, alpha: float, level: float) -> int:
    """Fixed-sequence testing along tau: how many leading hypotheses H0: FNR > alpha are rejected at ``level``."""
    rejected = binomial_pvalue(k, m, alpha) <= level
    return int(np.argmin(rejected)) if not rejected.all() else rejected.size


def _check_inputs(p, g, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=float).reshape(-1)
    g = np.zeros_like(p) if g is None else np.asarray(g, dtype=float).reshape(-1)
    y = np.asarray(y).astype(int).reshape(-1)
    if not (p.size == g.size == y.size):
        raise ValueError("p, g and y must have the same length")
    if p.size == 0:
        raise ValueError("calibration needs at least one val_calib sample")
    return p, g, y


def _infeasible_note(targets: Targets, fnr_at_xi: float | None, cov_at_alpha: float | None, what: str) -> str:
    alpha, xi = targets.alpha, targets.xi
    parts = [f"No threshold pair certifies FNR <= {alpha:g} with coverage >= {xi:g}."]
    if fnr_at_xi is not None:
        parts.append(f"At coverage {xi:g} the best certifiable FNR bound is {fnr_at_xi:.4f}.")
    else:
        parts.append(f"No {what} certifies coverage {xi:g} on this many images.")
    if cov_at_alpha is not None:
        parts.append(f"At FNR {alpha:g} the largest certified coverage is {cov_at_alpha:.4f}.")
    else:
        parts.append(f"No {what} certifies FNR {alpha:g} (too few exited positives).")
    return " ".join(parts)


def _operating_point(table: dict[str, np.ndarray], j: int, n: int, slack: float, level: float) -> dict[str, Any]:
    """Outcome fields of the chosen pair (column ``j`` of a pair table): coverage, FNR, their bounds, accuracy."""
    k, m, n_exit = int(table["k"][j]), int(table["m"][j]), int(table["n_exit"][j])
    coverage = n_exit / n
    return {
        "coverage": coverage,
        "coverage_lower": max(coverage - slack, 0.0),
        "fnr": k / m if m else float("nan"),
        "fnr_upper_pointwise": float(clopper_pearson_upper(k, m, level)),
        "accuracy_on_exits": (int(table["tp"][j]) + int(table["tn"][j])) / n_exit if n_exit else float("nan"),
        "exited_positives": m,
        "misses": k,
    }


def scan_and_pick(rule_cls: type[ScanRule], p, g, y, grid, targets: Targets) -> CalibrationOutcome:
    """SCRC-I for a rule with one grid threshold and tau (gate, band): test every pair, pick one (module doc)."""
    p, g, y = _check_inputs(p, g, y)
    grid = np.unique(np.asarray(grid, dtype=float))
    if grid.size == 0:
        raise ValueError(f"the {rule_cls.name} rule needs at least one {rule_cls.grid_name} value")
    n, n_pos = p.size, int(np.sum(y == 1))
    level = targets.delta2 / grid.size  # Bonferroni over the grid
    slack = rule_cls.coverage_slack(n, targets.delta1, grid.size)
    all_taus = tau_candidates(p)

    records: list[dict[str, Any]] = []
    best_key: tuple[float, float, float] | None = None
    best: tuple[float, float, dict, int] | None = None
    fallback_key: tuple[float, float] = (-1.0, -np.inf)
    fallback: tuple[float, float, dict, int] | None = None
    best_fnr_upper_at_xi: float | None = None
    max_cov_lower_at_alpha: float | None = None
    certified_total = 0

    for value in grid:
        taus, table = rule_cls.pair_table(p, g, y, float(value), all_taus)
        cov = table["n_exit"] / n  # (T,)
        coverage_ok = cov >= targets.xi + slack
        n_cert = _certified_prefix(table["k"], table["m"], targets.alpha, level)
        records.append(
            {
                rule_cls.grid_name: float(value),
                "coverage": float(cov[0]),
                "coverage_ok": bool(coverage_ok.any()),
                "exited_positives": int(table["m"][0]),
                "certified_taus": n_cert,
                "max_certified_tau": float(taus[n_cert - 1]) if n_cert else None,
                "max_certified_coverage": float(cov[n_cert - 1]) if n_cert else None,
                "min_tau_coverage_ok": float(taus[np.argmax(coverage_ok)]) if coverage_ok.any() else None,
            }
        )
        if coverage_ok.any():
            # Smallest FNR bound certifiable at coverage xi: the smallest tau reaching it has the fewest misses.
            j = int(np.argmax(coverage_ok))
            if table["m"][j] > 0:
                bound = float(clopper_pearson_upper(table["k"][j], table["m"][j], level))
                best_fnr_upper_at_xi = bound if best_fnr_upper_at_xi is None else min(best_fnr_upper_at_xi, bound)
        if n_cert == 0:
            continue
        values = _objective_values(table, targets.objective, n)[:n_cert]
        cov_cert = cov[:n_cert]
        max_cov_lower_at_alpha = max(max_cov_lower_at_alpha or 0.0, max(float(cov_cert.max()) - slack, 0.0))
        # Fallback: the certified pair with the largest coverage, then the best objective (first among ties).
        widest = np.flatnonzero(cov_cert == cov_cert.max())
        widest = widest[values[widest] == values[widest].max()]
        j_fb = int(widest[-1] if rule_cls.fallback_larger_tau else widest[0])
        if (float(cov[j_fb]), float(values[j_fb])) > fallback_key:
            fallback_key = (float(cov[j_fb]), float(values[j_fb]))
            fallback = (float(value), float(taus[j_fb]), table, j_fb)
        ok = coverage_ok[:n_cert]
        if not ok.any():
            continue
        certified_total += int(ok.sum())
        masked = np.where(ok, values, -np.inf)
        j = int(np.argmax(masked))  # first maximum = smallest tau among ties
        key = (float(masked[j]), float(cov[j]), -float(taus[j]))
        if best_key is None or key > best_key:
            best_key, best = key, (float(value), float(taus[j]), table, j)

    feasible = best is not None
    chosen = best if feasible else fallback
    if chosen is None:
        value = float(grid[-1])
        _, table = rule_cls.pair_table(p, g, y, value, np.array([0.0]))
        chosen = (value, 0.0, table, 0)
    value, tau, table, j = chosen
    note = rule_cls.note
    if not feasible:
        note = " ".join(s for s in (_infeasible_note(targets, best_fnr_upper_at_xi, max_cov_lower_at_alpha,
                                                     rule_cls.what), note) if s)  # fmt: skip
    return CalibrationOutcome(
        method="scrc",
        feasible=feasible,
        rule=rule_cls.from_grid_and_tau(value, tau),
        alpha=targets.alpha,
        delta=targets.delta,
        xi=targets.xi,
        n=n,
        n_pos=n_pos,
        delta1=targets.delta1,
        delta2=targets.delta2,
        grid=[float(v) for v in grid],
        **_operating_point(table, j, n, slack, level),
        certified_pairs=certified_total,
        attainable={
            "best_fnr_upper_at_coverage": best_fnr_upper_at_xi,
            "max_coverage_lower_at_fnr": max_cov_lower_at_alpha,
        },
        per_grid=records,
        note=note,
    )


# -------------------------------------------------------------------------------------------------------- CRC
def crc_threshold(p_pos, alpha: float, candidates=None) -> float:
    """Conformal risk control of the miss rate: the largest tau with (m * Rhat(tau) + 1) / (m + 1) <= alpha.

    Rhat(tau) is the fraction of the m positives with p < tau (loss bounded by B = 1), so E[FNR] <= alpha
    (Angelopoulos et al., 2022). Returns 0.0 (call everything roadwork) when no candidate qualifies.
    """
    p_pos = np.sort(np.asarray(p_pos, dtype=float))
    taus = tau_candidates(p_pos) if candidates is None else np.sort(np.asarray(candidates, dtype=float))
    misses = np.searchsorted(p_pos, taus, side="left")  # m * Rhat
    ok = (misses + 1.0) / (p_pos.size + 1.0) <= alpha
    return float(taus[ok].max()) if ok.any() else 0.0


def _crc_gate(rule_cls: type[GateRule], p, g, y, grid, targets: Targets) -> CalibrationOutcome:
    """Plain CRC: lambda = the largest grid value whose empirical exit rate is >= xi; tau by ``crc_threshold``.

    The FNR bound holds in expectation over the calibration draw (not with probability 1 - delta), and coverage is
    only matched empirically.
    """
    p, g, y = _check_inputs(p, g, y)
    grid = np.sort(np.asarray(grid, dtype=float))
    rates = np.array([np.mean(g >= lam) for lam in grid])
    ok = rates >= targets.xi
    lam = float(grid[ok].max()) if ok.any() else float(grid[0])
    exits = g >= lam
    tau = crc_threshold(p[exits & (y == 1)], targets.alpha, tau_candidates(p))
    point = _operating_point(_pair_table(p, y, exits, np.array([tau])), 0, p.size, 0.0, 0.5)
    return CalibrationOutcome(
        method="crc",
        feasible=bool(ok.any()),
        rule=rule_cls(lam=lam, tau=tau),
        alpha=targets.alpha,
        delta=targets.delta,
        xi=targets.xi,
        n=p.size,
        n_pos=int(np.sum(y == 1)),
        grid=[float(v) for v in grid],
        **{**point, "coverage_lower": None, "fnr_upper_pointwise": None},
        note="CRC: FNR <= alpha holds in expectation; coverage is matched empirically.",
    )


def _conformal_sets(rule_cls: type[SetsRule], p, g, y, grid, targets: Targets) -> CalibrationOutcome:
    """Class-conditional (Mondrian) conformal sets: each class is left out of its true set w.p. <= alpha.

    Thresholds come from ``crc_threshold`` per class (the roadwork class on p, the other on 1 - p), so in
    expectation at most alpha of all positives (hence of the roadwork images that exit) miss their class.
    """
    p, g, y = _check_inputs(p, g, y)
    rule = rule_cls(t_roadwork=crc_threshold(p[y == 1], targets.alpha),
                    t_no_roadwork=crc_threshold(1.0 - p[y == 0], targets.alpha))  # fmt: skip
    decisions = rule.decide(p, g)
    exits = decisions != "defer"
    predictions = (decisions == "roadwork").astype(int)
    k, m = FNROnExits.counts(y, predictions, exits)
    cov = float(exits.mean())
    return CalibrationOutcome(
        method="sets",
        feasible=cov >= targets.xi,
        rule=rule,
        alpha=targets.alpha,
        delta=0.0,
        xi=targets.xi,
        n=int(p.size),
        n_pos=int(np.sum(y == 1)),
        coverage=cov,
        fnr=k / m if m else float("nan"),
        accuracy_on_exits=float(np.mean(predictions[exits] == y[exits])) if exits.any() else float("nan"),
        exited_positives=m,
        misses=k,
        attainable={"avg_set_size": float(rule.sets(p).sum(axis=1).mean())},
        note="Prediction sets: class-conditional coverage in expectation; size 2 or 0 defers.",
    )


# ------------------------------------------------------------------------------------------------------ rules
Certifier = Callable[..., CalibrationOutcome]


@dataclass(frozen=True)
class Rule:
    """A stage-1 rule with its thresholds. Subclasses register themselves in ``RULES`` by ``name``."""

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
    def certify(cls, method: str, p, g, y, grid, targets: Targets) -> CalibrationOutcome:
        """Choose thresholds on val_calib with ``method`` (one of ``cls.certifiers``)."""
        cls.check_method(method)
        return cls.certifiers[method](cls, p, g, y, grid, targets)

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
        return all_taus, _pair_table(p, y, g >= value, all_taus)

    @classmethod
    def make_grid(cls, p_select, g_select, y_select, grid_size: int, xi_reach: float, alpha: float,
                  score_range: tuple[float, float]) -> np.ndarray:  # fmt: skip
        if g_select is not None and np.asarray(g_select).size:
            return gate_grid_from_scores(g_select, grid_size, 0.0, max(1.0 - xi_reach, 0.0))
        return fixed_gate_grid(grid_size, *score_range)

    @classmethod
    def coverage_slack(cls, n: int, delta1: float, grid_size: int) -> float:
        return dkw_slack(n, delta1)  # the exit rate's DKW bound is uniform over lambda already


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
        below = _pair_table(p, y, np.ones(p.shape, dtype=bool), taus)  # k, tn: the p < tau part of the exits
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


GateRule.certifiers = {"scrc": scan_and_pick, "crc": _crc_gate}
BandRule.certifiers = {"scrc": scan_and_pick}
SetsRule.certifiers = {"sets": _conformal_sets}


# --------------------------------------------------------------------------------------------------- registries
@dataclass(frozen=True)
class Method:
    """A certification method: what it guarantees, and the rule it implies (None: the configured rule)."""

    name: str
    description: str
    high_probability: bool
    rule: str | None = None


RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (GateRule, BandRule, SetsRule)}
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("scrc", "SCRC-I: FNR on exits <= alpha and coverage >= xi with probability >= 1 - delta", True),
        Method("crc", "conformal risk control: FNR on exits <= alpha in expectation", False),
        Method("sets", "class-conditional conformal prediction sets (in expectation)", False, rule="sets"),
    )
}


def list_rules() -> list[str]:
    """Names of the stage-1 rules."""
    return list(RULES)


def list_methods() -> list[str]:
    """Names of the certification methods."""
    return list(METHODS)


def create_rule(name: str) -> type[Rule]:
    """The rule class registered as ``name``."""
    if name not in RULES:
        raise UsageError(f"Unknown decision rule {name!r}; expected one of {', '.join(RULES)}.")
    return RULES[name]


def create_method(name: str) -> Method:
    """The method registered as ``name``."""
    if name not in METHODS:
        raise UsageError(f"Unknown calibration method {name!r}; expected one of {', '.join(METHODS)}.")
    return METHODS[name]


def rule_for(method: str, rule: str) -> type[Rule]:
    """The rule class a method certifies: the method's own rule if it implies one, else ``rule``."""
    return create_rule(create_method(method).rule or rule)


def rule_from_params(params: dict[str, Any]) -> Rule:
    """The rule of a scrc_params dict (version 1; a missing ``thresholds.rule`` means gate).

    Files written before the sets rule had its own name hold ``rule: gate`` (or none) with ``sets`` thresholds.
    """
    thresholds = params["thresholds"]
    name = "sets" if thresholds.get("sets") else thresholds.get("rule") or "gate"
    return create_rule(name).from_params(thresholds)


# ---------------------------------------------------------------------------------------- fit / conformalize
class SelectiveConformal:
    """fit -> conformalize -> predict for every rule, in the style of MAPIE.

    Example:
        >>> sc = SelectiveConformal(alpha=0.02, delta=0.1, xi=0.8).fit(g_select=g_select)
        >>> outcome = sc.conformalize(p_calib, g_calib, y_calib)
        >>> decisions = sc.predict(p_test, g_test)
    """

    def __init__(
        self,
        alpha: float,
        delta: float,
        xi: float,
        method: str = "scrc",
        rule: str = "gate",
        grid_size: int = 10,
        delta_coverage_share: float = 0.5,
        objective: str = "accuracy",
    ):
        self.targets = Targets(alpha, delta, xi, delta_coverage_share, objective)
        self.method = method
        self.rule_cls = rule_for(method, rule)
        self.rule_cls.check_method(method)
        self.grid_size = grid_size
        self.grid_: np.ndarray | None = None
        self.outcome_: CalibrationOutcome | None = None

    def fit(self, p_select=None, g_select=None, y_select=None, n_calib: int | None = None,
            score_range: tuple[float, float] = (0.0, 1.0)) -> SelectiveConformal:  # fmt: skip
        """Fix the grid before val_calib is seen.

        Args:
            p_select: Calibrated p on val_select (the band rule's b grid).
            g_select: Selection scores on val_select (the gate rule's lambda grid: quantiles at levels [0, 1 - xi]).
            y_select: Labels on val_select.
            n_calib: Number of val_calib images (a count, not data): the grid then reaches xi + the DKW slack, so
                every grid point can clear the coverage bound.
            score_range: Without val_select scores: a data-free grid evenly spaced on this score range.
        """
        t = self.targets
        slack = self.rule_cls.coverage_slack(n_calib, t.delta1, self.grid_size) if n_calib else 0.0
        self.grid_ = self.rule_cls.make_grid(
            p_select, g_select, y_select, self.grid_size, min(t.xi + slack, 1.0), t.alpha, score_range
        )
        return self

    def conformalize(self, p, g, y) -> CalibrationOutcome:
        """Choose thresholds on val_calib; the outcome is also kept as ``outcome_``."""
        if self.grid_ is None:
            self.fit()
        self.outcome_ = self.rule_cls.certify(self.method, p, g, y, self.grid_, self.targets)
        return self.outcome_

    def predict(self, p, g) -> np.ndarray:
        """Decisions in {"roadwork", "no_roadwork", "defer"} for calibrated p and selection scores g."""
        if self.outcome_ is None:
            raise RuntimeError("call conformalize() before predict()")
        return self.outcome_.rule.decide(p, g)


__all__ = [
    "BandRule",
    "CalibrationOutcome",
    "Coverage",
    "FNROnExits",
    "GateRule",
    "Method",
    "Rule",
    "SelectiveConformal",
    "SetsRule",
    "Targets",
    "create_method",
    "create_rule",
    "crc_threshold",
    "list_methods",
    "list_rules",
    "rule_for",
    "rule_from_params",
    "scan_and_pick",
]
