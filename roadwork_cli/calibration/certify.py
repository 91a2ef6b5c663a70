"""The certification methods: SCRC-I's scan over (grid value, tau) pairs, plain CRC and class-conditional sets.

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

Groups (``calibration/groups.py``): where val_calib images come in groups of more than one image (clips,
near-duplicates), ``scan_and_pick`` certifies over groups instead: the risk p-values are group-level Hoeffding-Bentkus
ones (Bonferroni over the grid and fixed sequence along tau as above), and coverage is tested per pair with the same
kind of p-value in a fixed sequence the rule names (``group_coverage_ok``). CRC and prediction sets refuse groups.

A certifier is called as ``certifier(rule_cls, p, g, y, grid, targets, groups)`` with the rule class it certifies
(``rules.py``); it only uses the class's documented hooks (``pair_table``, ``from_grid_and_tau``, ...), so this module
does not import the rules.

Rates (FNR, coverage, accuracy on exits) come from ``metrics.selective``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from roadwork_cli.calibration.grids import tau_candidates
from roadwork_cli.calibration.groups import (
    GroupIndex,
    coverage_lower_bound,
    coverage_pvalues,
    fixed_sequence_prefix,
    groups_entered,
    risk_pvalues,
    risk_upper_bound,
)
from roadwork_cli.calibration.stats import binomial_pvalue, clopper_pearson_upper
from roadwork_cli.calibration.targets import CalibrationOutcome, Targets
from roadwork_cli.errors import UsageError
from roadwork_cli.metrics import selective as sm


# ------------------------------------------------------------------------------------------------- shared scan
def exit_pair_table(p: np.ndarray, y: np.ndarray, exits: np.ndarray, taus: np.ndarray) -> dict[str, np.ndarray]:
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
        "fnr": sm.rate(k, m),
        "fnr_upper_pointwise": float(clopper_pearson_upper(k, m, level)),
        "accuracy_on_exits": sm.rate(int(table["tp"][j]) + int(table["tn"][j]), n_exit),
        "exited_positives": m,
        "misses": k,
    }


def _grouped(groups: GroupIndex | None, n: int) -> GroupIndex | None:
    """The groups when they make a difference (some group holds more than one image), else None."""
    if groups is None or groups.singletons:
        return None
    if groups.index.size != n:
        raise ValueError("groups must name the group of every calibration sample")
    return groups


def _refuse_groups(groups: GroupIndex | None, n: int, method: str) -> None:
    if _grouped(groups, n) is not None:
        raise UsageError(
            f"calibration.method={method} assumes independent images, but val_calib holds groups of up to "
            f"{groups.largest} images (clips or near-duplicates). Use calibration.method=scrc, which certifies over "
            "groups, or set data.group_by: none if the images really are independent."
        )


class _GroupTests:
    """Group-level counterparts of the image-level tests inside ``scan_and_pick`` (module doc)."""

    def __init__(self, rule_cls: type, p, g, y, grid: np.ndarray, all_taus: np.ndarray, groups: GroupIndex, targets):
        self.rule_cls, self.p, self.g, self.y, self.groups, self.targets = rule_cls, p, g, y, groups, targets
        self.tables = [rule_cls.pair_table(p, g, y, float(value), all_taus) for value in grid]  # reused by the scan
        pvalues = [
            coverage_pvalues(t["n_exit"], p.size, groups.count, groups.largest, targets.xi) for _, t in self.tables
        ]
        self.coverage_ok = rule_cls.group_coverage_ok(pvalues, targets.delta1)

    def positive_groups(self, value: float, taus: np.ndarray) -> np.ndarray:
        return groups_entered(self.rule_cls.positive_entry(self.p, self.g, self.y, value), self.groups, taus)

    def risk_pvalues(self, value: float, taus: np.ndarray, table: dict[str, np.ndarray]) -> np.ndarray:
        g_pos = self.positive_groups(value, taus)
        return risk_pvalues(table["k"], table["m"], g_pos, self.groups.largest, self.targets.alpha)

    def fnr_upper(self, value: float, tau: float, misses: int, exited_positives: int, level: float) -> float:
        g_pos = int(self.positive_groups(value, np.array([tau]))[0])
        return risk_upper_bound(misses, exited_positives, g_pos, self.groups.largest, level)

    def coverage_lower(self, exits: int, level: float) -> float:
        return coverage_lower_bound(exits, self.p.size, self.groups.count, self.groups.largest, level)


def scan_and_pick(
    rule_cls: type, p, g, y, grid, targets: Targets, groups: GroupIndex | None = None
) -> CalibrationOutcome:
    """SCRC-I for a rule with one grid threshold and tau (gate, band): test every pair, pick one (module doc)."""
    p, g, y = _check_inputs(p, g, y)
    grid = np.unique(np.asarray(grid, dtype=float))
    if grid.size == 0:
        raise ValueError(f"the {rule_cls.name} rule needs at least one {rule_cls.grid_name} value")
    n, n_pos = p.size, int(np.sum(y == 1))
    level = targets.delta2 / grid.size  # Bonferroni over the grid
    slack = rule_cls.coverage_slack(n, targets.delta1, grid.size)
    all_taus = tau_candidates(p)
    grouped = _grouped(groups, n)
    tests = _GroupTests(rule_cls, p, g, y, grid, all_taus, grouped, targets) if grouped is not None else None

    records: list[dict[str, Any]] = []
    best_key: tuple[float, float, float] | None = None
    best: tuple[float, float, dict, int] | None = None
    fallback_key: tuple[float, float] = (-1.0, -np.inf)
    fallback: tuple[float, float, dict, int] | None = None
    best_fnr_upper_at_xi: float | None = None
    max_cov_lower_at_alpha: float | None = None
    certified_total = 0

    for i, value in enumerate(grid):
        taus, table = rule_cls.pair_table(p, g, y, float(value), all_taus) if tests is None else tests.tables[i]
        cov = table["n_exit"] / n  # (T,)
        if tests is None:
            coverage_ok = cov >= targets.xi + slack
            n_cert = _certified_prefix(table["k"], table["m"], targets.alpha, level)
        else:
            coverage_ok = tests.coverage_ok[i]
            n_cert = fixed_sequence_prefix(tests.risk_pvalues(float(value), taus, table), level)
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
                bound = (
                    float(clopper_pearson_upper(table["k"][j], table["m"][j], level))
                    if tests is None
                    else tests.fnr_upper(float(value), float(taus[j]), int(table["k"][j]), int(table["m"][j]), level)
                )
                best_fnr_upper_at_xi = bound if best_fnr_upper_at_xi is None else min(best_fnr_upper_at_xi, bound)
        if n_cert == 0:
            continue
        values = _objective_values(table, targets.objective, n)[:n_cert]
        cov_cert = cov[:n_cert]
        widest_lower = (
            max(float(cov_cert.max()) - slack, 0.0)
            if tests is None
            else tests.coverage_lower(int(round(float(cov_cert.max()) * n)), targets.delta1)
        )
        max_cov_lower_at_alpha = max(max_cov_lower_at_alpha or 0.0, widest_lower)
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
    point = _operating_point(table, j, n, slack, level)
    unit: dict[str, Any] = {}
    if tests is not None:
        point["fnr_upper_pointwise"] = tests.fnr_upper(value, tau, point["misses"], point["exited_positives"], level)
        point["coverage_lower"] = tests.coverage_lower(int(table["n_exit"][j]), targets.delta1)
        unit = {"unit": "groups", "n_groups": grouped.count, "largest_group": grouped.largest}
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
        **point,
        **unit,
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


def crc_gate(rule_cls: type, p, g, y, grid, targets: Targets, groups: GroupIndex | None = None) -> CalibrationOutcome:
    """Plain CRC: lambda = the largest grid value whose empirical exit rate is >= xi; tau by ``crc_threshold``.

    The FNR bound holds in expectation over the calibration draw (not with probability 1 - delta), and coverage is
    only matched empirically.
    """
    p, g, y = _check_inputs(p, g, y)
    _refuse_groups(groups, p.size, "crc")
    grid = np.sort(np.asarray(grid, dtype=float))
    rates = np.array([np.mean(g >= lam) for lam in grid])
    ok = rates >= targets.xi
    lam = float(grid[ok].max()) if ok.any() else float(grid[0])
    exits = g >= lam
    tau = crc_threshold(p[exits & (y == 1)], targets.alpha, tau_candidates(p))
    point = _operating_point(exit_pair_table(p, y, exits, np.array([tau])), 0, p.size, 0.0, 0.5)
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


def conformal_sets(
    rule_cls: type, p, g, y, grid, targets: Targets, groups: GroupIndex | None = None
) -> CalibrationOutcome:
    """Class-conditional (Mondrian) conformal sets: each class is left out of its true set w.p. <= alpha.

    Thresholds come from ``crc_threshold`` per class (the roadwork class on p, the other on 1 - p), so in
    expectation at most alpha of all positives (hence of the roadwork images that exit) miss their class.
    """
    p, g, y = _check_inputs(p, g, y)
    _refuse_groups(groups, p.size, "sets")
    rule = rule_cls(t_roadwork=crc_threshold(p[y == 1], targets.alpha),
                    t_no_roadwork=crc_threshold(1.0 - p[y == 0], targets.alpha))  # fmt: skip
    decisions = rule.decide(p, g)
    exits = decisions != "defer"
    predictions = (decisions == "roadwork").astype(int)
    k, m = sm.fnr_counts(y, predictions, exits)
    cov = sm.coverage(exits)
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
        fnr=sm.rate(k, m),
        accuracy_on_exits=sm.accuracy_on_exits(y, predictions, exits),
        exited_positives=m,
        misses=k,
        attainable={"avg_set_size": float(rule.sets(p).sum(axis=1).mean())},
        note="Prediction sets: class-conditional coverage in expectation; size 2 or 0 defers.",
    )


__all__ = ["conformal_sets", "crc_gate", "crc_threshold", "exit_pair_table", "scan_and_pick"]
