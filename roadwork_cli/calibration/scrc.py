"""SCRC-I: thresholds (lambda, tau) with a high-probability guarantee on FNR among exits and on coverage.

Rule: exit iff g >= lambda; on exit decide roadwork iff p >= tau. On the n val_calib images, with probability at least
1 - delta over the calibration draw, the chosen pair satisfies FNR_on_exits <= alpha AND coverage >= xi, where
delta = delta1 (coverage) + delta2 (risk):

1. Coverage (DKW/Massart, one-sided, uniform over every lambda): keep lambda whose empirical exit rate is at least
   xi + sqrt(ln(1/delta1) / (2n)).
2. Risk: for each lambda of a grid G fixed before val_calib is seen, the m exited positives and the k(tau) of them
   with p < tau give the exact binomial p-value P(Bin(m, alpha) <= k(tau)) of H0: FNR(lambda, tau) > alpha.
   tau is scanned upwards (fewest misses first) as a fixed sequence that stops at the first p-value above
   delta2 / |G| (Bonferroni over G). Because FNR and k(tau) both grow with tau the scan needs no correction.
3. Among certified pairs the objective (accuracy on exits, then coverage) picks one.

``scrc_band`` certifies the opt-in band rule instead (exit iff p < tau -> no_roadwork or p >= b -> roadwork; defer
iff tau <= p < b) over a b grid B, with Bonferroni over |B| for both the risk and the coverage bound.

Also here: plain CRC (Angelopoulos et al., guarantee in expectation) and class-conditional prediction sets.
``SelectiveConformal`` wraps it in a fit -> conformalize -> predict flow (MAPIE style).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

DECISIONS = ("roadwork", "no_roadwork", "defer")


# ----------------------------------------------------------------------------------------------------------- risks
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


# ------------------------------------------------------------------------------------------------ exact statistics
def binomial_pvalue(k, m, alpha: float) -> np.ndarray:
    """Exact p-value of H0: rate > alpha after k events in m trials: P(Bin(m, alpha) <= k) (1 when m = 0)."""
    # scipy.special.bdtr is the ufunc behind scipy.stats.binom.cdf, minus the distribution-object overhead that
    # dominates when SCRC-I is run hundreds of times in the statistical tests.
    from scipy.special import bdtr

    k, m = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(m, dtype=float))
    return np.where(m > 0, bdtr(k, m, alpha), 1.0)


def clopper_pearson_upper(k, m, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: the rate is below it with probability >= 1 - level (1 if k = m)."""
    # betaincinv(a, b, q) is scipy.stats.beta.ppf(q, a, b) without importing scipy.stats (slow to import).
    from scipy.special import betaincinv

    k, m = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(m, dtype=float))
    out = np.ones(k.shape, dtype=float)
    ok = k < m
    out[ok] = betaincinv(k[ok] + 1, m[ok] - k[ok], 1.0 - level)
    return out


def clopper_pearson_lower(k, m, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: the rate is above it with probability >= 1 - level (0 if k = 0)."""
    from scipy.special import betaincinv

    k, m = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(m, dtype=float))
    out = np.zeros(k.shape, dtype=float)
    ok = k > 0
    out[ok] = betaincinv(k[ok], m[ok] - k[ok] + 1, level)
    return out


def dkw_slack(n: int, delta1: float) -> float:
    """One-sided DKW/Massart deviation: sup_lambda (empirical - true exit rate) <= this w.p. >= 1 - delta1."""
    return math.sqrt(math.log(1.0 / delta1) / (2.0 * n)) if n > 0 else float("inf")


# ------------------------------------------------------------------------------------------------------------ grids
def gate_grid_from_scores(g_select, grid_size: int, low_level: float = 0.0, high_level: float = 1.0) -> np.ndarray:
    """Lambda grid = quantiles of the selection score on val_select at evenly spaced levels (fixed pre-val_calib).

    Level q gives an exit rate of about 1 - q, so ``[0, 1 - xi]`` spans every coverage at or above xi. The first
    value is replaced by -inf so that "everything exits" is always in the grid.
    """
    g_select = np.asarray(g_select, dtype=float)
    levels = np.linspace(low_level, high_level, grid_size)
    grid = np.unique(np.quantile(g_select, levels)) if g_select.size else np.linspace(0, 1, grid_size)
    grid[0] = -np.inf
    return grid


def fixed_gate_grid(grid_size: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Data-free lambda grid: ``grid_size`` evenly spaced values on [low, high) of the score scale (low -> -inf)."""
    grid = np.linspace(low, high, grid_size, endpoint=False)
    grid[0] = -np.inf
    return grid


def tau_candidates(p) -> np.ndarray:
    """Candidate tau: 0, then midpoints between consecutive distinct p (ascending; each step adds misses)."""
    unique = np.unique(np.asarray(p, dtype=float))
    return np.concatenate([[0.0], (unique[:-1] + unique[1:]) / 2.0]) if unique.size else np.array([0.0])


# ---------------------------------------------------------------------------------------------------------- results
@dataclass
class CalibrationOutcome:
    """Chosen thresholds and everything needed to audit them (serialised into scrc_params.json).

    ``lam`` / ``tau`` are None in prediction-set mode, which uses ``set_thresholds`` instead. ``rule`` is "gate"
    (exit iff g >= lam) or "band" (exit iff p < tau or p >= b; ``lam`` is None and ``grid`` holds the b grid).
    """

    method: str
    feasible: bool
    lam: float | None
    tau: float | None
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
    fnr_upper: float | None = None
    accuracy_on_exits: float = float("nan")
    exited_positives: int = 0
    misses: int = 0
    certified_pairs: int = 0
    attainable: dict[str, float | None] = field(default_factory=dict)
    per_lambda: list[dict[str, Any]] = field(default_factory=list)
    set_thresholds: dict[str, float] | None = None
    note: str = ""
    rule: str = "gate"
    b: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: NaN/inf become None (the grid's -inf is written as null = 'everything exits')."""
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _exit_mask(g: np.ndarray, lam: float) -> np.ndarray:
    return g >= lam


def _pair_table(p: np.ndarray, y: np.ndarray, exits: np.ndarray, taus: np.ndarray) -> dict[str, np.ndarray]:
    """Counts for every tau at one lambda: misses k, false alarms, correct exits; vectorised with searchsorted."""
    pos = np.sort(p[exits & (y == 1)])
    neg = np.sort(p[exits & (y == 0)])
    k = np.searchsorted(pos, taus, side="left")  # positives with p < tau: misses
    tn = np.searchsorted(neg, taus, side="left")  # negatives with p < tau: correct no_roadwork
    tp = pos.size - k
    fp = neg.size - tn
    return {"k": k, "tp": tp, "tn": tn, "fp": fp, "m": np.full(taus.shape, pos.size), "n_exit": pos.size + neg.size}


def _objective_values(table: dict[str, np.ndarray], objective: str, n: int) -> np.ndarray:
    # n_exit is one count for the gate rule and one per tau for the band rule (there tau moves the exits).
    n_exit = np.broadcast_to(np.asarray(table["n_exit"], dtype=float), table["k"].shape)
    if objective == "accuracy":
        with np.errstate(invalid="ignore", divide="ignore"):
            values = (table["tp"] + table["tn"]) / n_exit
    elif objective == "coverage":
        values = n_exit / n
    elif objective == "mcc":
        tp, tn, fp, fn = (table[key].astype(float) for key in ("tp", "tn", "fp", "k"))
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)
    else:
        raise ValueError(f"unknown objective {objective!r}; choose accuracy, coverage or mcc")
    return np.where(n_exit > 0, values, -np.inf)


def _check_inputs(p, g, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=float).reshape(-1)
    g = np.asarray(g, dtype=float).reshape(-1)
    y = np.asarray(y).astype(int).reshape(-1)
    if not (p.size == g.size == y.size):
        raise ValueError("p, g and y must have the same length")
    if p.size == 0:
        raise ValueError("calibration needs at least one val_calib sample")
    return p, g, y


def _certified_prefix(k, m, alpha: float, level: float) -> int:
    """Fixed-sequence testing along tau: how many leading hypotheses H0: FNR > alpha are rejected at ``level``."""
    rejected = binomial_pvalue(k, m, alpha) <= level
    return int(np.argmin(rejected)) if not rejected.all() else rejected.size


def _operating_point(table: dict[str, np.ndarray], j: int, n_exit: int, n: int, slack: float, level: float) -> dict:
    """Outcome fields of the chosen pair (column ``j`` of a pair table): coverage, FNR, their bounds, accuracy."""
    k, m = int(table["k"][j]), int(table["m"][j])
    cov = n_exit / n
    return {
        "coverage": cov,
        "coverage_lower": max(cov - slack, 0.0),
        "fnr": k / m if m else float("nan"),
        "fnr_upper": float(clopper_pearson_upper(k, m, level)),
        "accuracy_on_exits": (int(table["tp"][j]) + int(table["tn"][j])) / n_exit if n_exit else float("nan"),
        "exited_positives": m,
        "misses": k,
    }


def scrc_i(
    p,
    g,
    y,
    grid,
    alpha: float,
    delta: float,
    xi: float,
    delta_coverage_share: float = 0.5,
    objective: str = "accuracy",
) -> CalibrationOutcome:
    """Run SCRC-I on val_calib scores.

    Args:
        p: Calibrated p(roadwork), shape (n,).
        g: Selection score, shape (n,).
        y: 0/1 labels, shape (n,).
        grid: Lambda grid G, fixed before val_calib was seen.
        alpha: FNR target among exits.
        delta: Total failure probability; delta1 = share * delta is spent on coverage, delta2 = delta - delta1 on risk.
        xi: Coverage target.
        delta_coverage_share: The share of delta spent on coverage.
        objective: accuracy | coverage | mcc on calib exits (ties broken by coverage, then the smaller tau).

    Returns:
        The outcome; ``feasible`` is False when no certified pair meets the coverage bound (the caller decides
        whether that is an error). The fallback thresholds are then the certified pair with the largest coverage,
        or (lambda = max grid, tau = 0) when nothing is certified.
    """
    p, g, y = _check_inputs(p, g, y)
    grid = np.sort(np.asarray(grid, dtype=float))
    n, n_pos = p.size, int(np.sum(y == 1))
    delta1 = delta_coverage_share * delta
    delta2 = delta - delta1
    level = delta2 / grid.size  # Bonferroni over the lambda grid
    slack = dkw_slack(n, delta1)
    taus = tau_candidates(p)

    per_lambda: list[dict[str, Any]] = []
    best_key: tuple[float, float, float] | None = None
    best: dict[str, Any] | None = None
    fallback_key: tuple[float, float] | None = None
    fallback: dict[str, Any] | None = None
    best_fnr_upper_at_xi: float | None = None
    max_cov_lower_at_alpha: float | None = None
    certified_total = 0

    for lam in grid:
        exits = _exit_mask(g, lam)
        cov = float(exits.mean())
        coverage_ok = cov >= xi + slack
        table = _pair_table(p, y, exits, taus)
        m = int(table["m"][0])
        n_cert = _certified_prefix(table["k"], m, alpha, level)
        record = {
            "lambda": float(lam),
            "coverage": cov,
            "coverage_ok": bool(coverage_ok),
            "exited_positives": m,
            "certified_taus": n_cert,
            "max_certified_tau": float(taus[n_cert - 1]) if n_cert else None,
        }
        per_lambda.append(record)
        if coverage_ok and m > 0:
            # Smallest FNR bound certifiable at this coverage: tau = 0 (no misses) at level delta2/|G|.
            bound = float(clopper_pearson_upper(0, m, level))
            best_fnr_upper_at_xi = bound if best_fnr_upper_at_xi is None else min(best_fnr_upper_at_xi, bound)
        if n_cert == 0:
            continue
        max_cov_lower_at_alpha = max(max_cov_lower_at_alpha or 0.0, max(cov - slack, 0.0))
        values = _objective_values(table, objective, n)[:n_cert]
        j = int(np.argmax(values))  # first maximum = smallest tau among ties
        candidate = {"lam": float(lam), "tau": float(taus[j]), "cov": cov, "table": table, "j": j}
        if (cov, float(values[j])) > (fallback_key or (-1.0, -np.inf)):
            fallback_key, fallback = (cov, float(values[j])), candidate
        if not coverage_ok:
            continue
        certified_total += n_cert
        key = (float(values[j]), cov, -float(taus[j]))
        if best_key is None or key > best_key:
            best_key, best = key, candidate

    feasible = best is not None
    chosen = best if feasible else fallback
    if chosen is None:
        exits = _exit_mask(g, grid[-1])
        chosen = {"lam": float(grid[-1]), "tau": 0.0, "cov": float(exits.mean())}
        chosen["table"] = _pair_table(p, y, exits, np.array([0.0]))
        chosen["j"] = 0
    table, j = chosen["table"], chosen["j"]
    outcome = CalibrationOutcome(
        method="scrc",
        feasible=feasible,
        lam=chosen["lam"],
        tau=chosen["tau"],
        alpha=alpha,
        delta=delta,
        xi=xi,
        n=n,
        n_pos=n_pos,
        delta1=delta1,
        delta2=delta2,
        grid=[float(v) for v in grid],
        **_operating_point(table, j, int(table["n_exit"]), n, slack, level),
        certified_pairs=certified_total,
        attainable={
            "best_fnr_upper_at_coverage": best_fnr_upper_at_xi,
            "max_coverage_lower_at_fnr": max_cov_lower_at_alpha,
        },
        per_lambda=per_lambda,
        note="" if feasible else _infeasible_note(alpha, xi, best_fnr_upper_at_xi, max_cov_lower_at_alpha),
    )
    return outcome


def _infeasible_note(
    alpha: float, xi: float, fnr_at_xi: float | None, cov_at_alpha: float | None, rule: str = "gate"
) -> str:
    what = "gate threshold" if rule == "gate" else "band (b, tau)"
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


# ------------------------------------------------------------------------------------------------------- band rule
def band_grid_from_scores(p_select, y_select, grid_size: int, xi: float, alpha: float, headroom: float = 2.0):
    """b grid = quantiles of calibrated p on val_select at ``grid_size`` evenly spaced levels (fixed pre-val_calib).

    With tau = 0 the band defers every p < b, so level ``1 - xi`` is the lowest useful b. A tau certified at FNR
    alpha gives back about F(tau) of mass, so the top level is ``1 - xi + F(t)`` with t the ``headroom * alpha``
    quantile of the val_select positives' p (a plug-in tau with room above it); the grid's points thus sit where
    the coverage constraint binds instead of being spread over the whole p range.

    Args:
        p_select: Calibrated p on val_select, shape (n,).
        y_select: Its 0/1 labels, shape (n,).
        grid_size: Number of levels (duplicates of tied quantiles are dropped).
        xi: Coverage the grid should reach (pass xi + DKW slack).
        alpha: FNR target.
        headroom: Multiple of alpha for the plug-in tau.
    """
    p_select = np.asarray(p_select, dtype=float)
    y_select = np.asarray(y_select).astype(int)
    if not p_select.size:
        return fixed_band_grid(grid_size)
    low = min(max(1.0 - xi, 0.0), 1.0)
    positives = p_select[y_select == 1]
    plug_in_tau = float(np.quantile(positives, min(headroom * alpha, 1.0))) if positives.size else 1.0
    high = min(low + float(np.mean(p_select < plug_in_tau)), 1.0)
    return np.unique(np.quantile(p_select, np.linspace(low, high, grid_size)))


def fixed_band_grid(grid_size: int, low: float = 0.5, high: float = 1.0) -> np.ndarray:
    """Data-free b grid: ``grid_size`` evenly spaced values on [low, high) of the p scale."""
    return np.linspace(low, high, grid_size, endpoint=False)


def _band_table(p: np.ndarray, y: np.ndarray, b: float, taus: np.ndarray) -> dict[str, np.ndarray]:
    """Counts for every tau <= b at one b: exits are p < tau (no_roadwork) and p >= b (roadwork)."""
    below = _pair_table(p, y, np.ones(p.shape, dtype=bool), taus)  # k, tn: the p < tau part of the exits
    upper = p >= b
    tp, fp = int(np.sum(upper & (y == 1))), int(np.sum(upper & (y == 0)))
    k, tn = below["k"], below["tn"]
    return {"k": k, "tp": np.full(taus.shape, tp), "tn": tn, "fp": np.full(taus.shape, fp), "m": k + tp,
            "n_exit": k + tn + tp + fp}  # fmt: skip


def scrc_band(
    p,
    y,
    b_grid,
    alpha: float,
    delta: float,
    xi: float,
    delta_coverage_share: float = 0.5,
    objective: str = "accuracy",
) -> CalibrationOutcome:
    """SCRC-I for the band rule: exit iff p < tau (no_roadwork) or p >= b (roadwork); defer iff tau <= p < b.

    The selection score plays no role; only calibrated p and a grid B of b values, fixed before val_calib, are used.
    With probability at least 1 - delta1 - delta2 over the n val_calib images, the chosen (b, tau) has
    FNR_on_exits <= alpha AND coverage >= xi:

    1. Risk, for each b in B: FNR(b, tau) = P(p < tau, y = 1) / P(p < tau or p >= b, y = 1) is non-decreasing in
       tau (tau <= b; the numerator grows and the denominator by the same amount), so tau is scanned upwards as a
       fixed sequence that stops at the first hypothesis not rejected. Given the m(tau) exited positives, the
       k(tau) of them with p < tau are Bin(m, FNR), so H0: FNR(b, tau) > alpha is rejected when
       P(Bin(m, alpha) <= k) <= delta2 / |B| (Bonferroni over B).
    2. Coverage, for each b in B: the deferred mass P(tau <= p < b) = P(W >= tau) with W = p if p < b else -inf,
       one survival function for every tau, so the one-sided DKW/Massart bound holds uniformly in tau at level
       delta1 / |B|: keep pairs whose empirical coverage is at least xi + sqrt(ln(|B| / delta1) / (2n)).
    3. Among certified pairs the objective (accuracy on exits, then coverage, then the smaller tau) picks one.

    Args:
        p: Calibrated p(roadwork), shape (n,).
        y: 0/1 labels, shape (n,).
        b_grid: The grid B of upper thresholds, fixed before val_calib was seen.
        alpha: FNR target among exits.
        delta: Total failure probability; delta1 = share * delta for coverage, delta2 = delta - delta1 for risk.
        xi: Coverage target.
        delta_coverage_share: The share of delta spent on coverage.
        objective: accuracy | coverage | mcc on calib exits.

    Returns:
        The outcome (``rule`` = "band", ``lam`` None, ``b`` and ``tau`` set). When infeasible, the fallback is the
        certified pair with the largest coverage, or (b = max B, tau = 0) when nothing is certified.
    """
    p, _, y = _check_inputs(p, p, y)
    grid = np.unique(np.asarray(b_grid, dtype=float))
    if grid.size == 0:
        raise ValueError("the band rule needs at least one b value")
    n, n_pos = p.size, int(np.sum(y == 1))
    delta1 = delta_coverage_share * delta
    delta2 = delta - delta1
    level = delta2 / grid.size  # Bonferroni over B, for risk ...
    slack = dkw_slack(n, delta1 / grid.size)  # ... and for coverage
    all_taus = tau_candidates(p)

    per_b: list[dict[str, Any]] = []
    best_key: tuple[float, float, float] | None = None
    best: dict[str, Any] | None = None
    fallback_key: tuple[float, float] | None = None
    fallback: dict[str, Any] | None = None
    best_fnr_upper_at_xi: float | None = None
    max_cov_lower_at_alpha: float | None = None
    certified_total = 0

    for b in grid:
        taus = np.append(all_taus[all_taus < b], b)  # tau = b: the band is empty, everything exits
        table = _band_table(p, y, b, taus)
        cov = table["n_exit"] / n
        coverage_ok = cov >= xi + slack
        n_cert = _certified_prefix(table["k"], table["m"], alpha, level)
        per_b.append(
            {
                "b": float(b),
                "certified_taus": n_cert,
                "max_certified_tau": float(taus[n_cert - 1]) if n_cert else None,
                "max_certified_coverage": float(cov[n_cert - 1]) if n_cert else None,
                "min_tau_coverage_ok": float(taus[np.argmax(coverage_ok)]) if coverage_ok.any() else None,
            }
        )
        if coverage_ok.any():
            # Smallest FNR bound certifiable at coverage xi: the smallest tau that reaches it has the fewest misses.
            j = int(np.argmax(coverage_ok))
            bound = float(clopper_pearson_upper(table["k"][j], table["m"][j], level))
            best_fnr_upper_at_xi = bound if best_fnr_upper_at_xi is None else min(best_fnr_upper_at_xi, bound)
        if n_cert == 0:
            continue
        values = _objective_values(table, objective, n)[:n_cert]
        # Coverage grows with tau, so the last certified tau has the largest certified coverage at this b.
        j_cov = n_cert - 1
        max_cov_lower_at_alpha = max(max_cov_lower_at_alpha or 0.0, max(float(cov[j_cov]) - slack, 0.0))
        if (float(cov[j_cov]), float(values[j_cov])) > (fallback_key or (-1.0, -np.inf)):
            fallback_key = (float(cov[j_cov]), float(values[j_cov]))
            fallback = {"b": float(b), "tau": float(taus[j_cov]), "table": table, "j": j_cov}
        ok = coverage_ok[:n_cert]
        if not ok.any():
            continue
        certified_total += int(ok.sum())
        masked = np.where(ok, values, -np.inf)
        j = int(np.argmax(masked))  # first maximum = smallest tau among ties
        key = (float(masked[j]), float(cov[j]), -float(taus[j]))
        if best_key is None or key > best_key:
            best_key, best = key, {"b": float(b), "tau": float(taus[j]), "table": table, "j": j}

    feasible = best is not None
    chosen = best if feasible else fallback
    if chosen is None:
        b = float(grid[-1])
        chosen = {"b": b, "tau": 0.0, "table": _band_table(p, y, b, np.array([0.0])), "j": 0}
    table, j = chosen["table"], chosen["j"]
    note = "Band rule: exit iff p < tau or p >= b; the selection score plays no role in the decisions."
    if not feasible:
        note = _infeasible_note(alpha, xi, best_fnr_upper_at_xi, max_cov_lower_at_alpha, "band") + " " + note
    return CalibrationOutcome(
        method="scrc",
        feasible=feasible,
        lam=None,
        tau=chosen["tau"],
        alpha=alpha,
        delta=delta,
        xi=xi,
        n=n,
        n_pos=n_pos,
        delta1=delta1,
        delta2=delta2,
        grid=[float(v) for v in grid],
        **_operating_point(table, j, int(table["n_exit"][j]), n, slack, level),
        certified_pairs=certified_total,
        attainable={
            "best_fnr_upper_at_coverage": best_fnr_upper_at_xi,
            "max_coverage_lower_at_fnr": max_cov_lower_at_alpha,
        },
        per_lambda=per_b,
        note=note,
        rule="band",
        b=chosen["b"],
    )


# -------------------------------------------------------------------------------------------------------------- CRC
def crc_threshold(p_pos, alpha: float, candidates=None) -> float:
    """Conformal risk control of the miss rate: the largest tau with (m * Rhat(tau) + 1) / (m + 1) <= alpha.

    Rhat(tau) is the fraction of the m positives with p < tau (loss bounded by B = 1), so E[FNR] <= alpha
    (Angelopoulos et al., 2022). Returns 0.0 (call everything roadwork) when no candidate qualifies.
    """
    p_pos = np.sort(np.asarray(p_pos, dtype=float))
    taus = tau_candidates(p_pos) if candidates is None else np.sort(np.asarray(candidates, dtype=float))
    m = p_pos.size
    misses = np.searchsorted(p_pos, taus, side="left")
    ok = (misses + 1.0) / (m + 1.0) <= alpha  # m * Rhat = misses
    return float(taus[ok].max()) if ok.any() else 0.0


def crc(p, g, y, grid, alpha: float, xi: float, delta: float = 0.0, objective: str = "accuracy") -> CalibrationOutcome:
    """Plain CRC: lambda = the largest grid value whose empirical exit rate is >= xi; tau by ``crc_threshold``.

    The FNR bound holds in expectation over the calibration draw (not with probability 1 - delta), and coverage is
    only matched empirically; use ``scrc_i`` for the high-probability guarantee.
    """
    p, g, y = _check_inputs(p, g, y)
    grid = np.sort(np.asarray(grid, dtype=float))
    n, n_pos = p.size, int(np.sum(y == 1))
    rates = np.array([_exit_mask(g, lam).mean() for lam in grid])
    ok = rates >= xi
    lam = float(grid[ok].max()) if ok.any() else float(grid[0])
    exits = _exit_mask(g, lam)
    tau = crc_threshold(p[exits & (y == 1)], alpha, tau_candidates(p))
    table = _pair_table(p, y, exits, np.array([tau]))
    k, m, n_exit = int(table["k"][0]), int(table["m"][0]), int(table["n_exit"])
    return CalibrationOutcome(
        method="crc",
        feasible=bool(ok.any()),
        lam=lam,
        tau=tau,
        alpha=alpha,
        delta=delta,
        xi=xi,
        n=n,
        n_pos=n_pos,
        grid=[float(v) for v in grid],
        coverage=float(exits.mean()),
        fnr=k / m if m else float("nan"),
        accuracy_on_exits=(int(table["tp"][0]) + int(table["tn"][0])) / n_exit if n_exit else float("nan"),
        exited_positives=m,
        misses=k,
        note="CRC: FNR <= alpha holds in expectation; coverage is matched empirically.",
    )


# --------------------------------------------------------------------------------------------------- prediction sets
def prediction_sets(p, t_roadwork: float, t_no_roadwork: float) -> np.ndarray:
    """Membership matrix (N, 2): class 1 included iff p >= t_roadwork, class 0 iff 1 - p >= t_no_roadwork."""
    p = np.asarray(p, dtype=float)
    return np.stack([(1.0 - p) >= t_no_roadwork, p >= t_roadwork], axis=1)


def decisions_from_sets(sets: np.ndarray) -> np.ndarray:
    """Singletons exit with their class; empty or full sets defer."""
    sets = np.asarray(sets, dtype=bool)
    out = np.full(sets.shape[0], "defer", dtype=object)
    out[sets[:, 1] & ~sets[:, 0]] = "roadwork"
    out[sets[:, 0] & ~sets[:, 1]] = "no_roadwork"
    return out.astype(str)


def conformal_sets(p, y, alpha: float, xi: float) -> CalibrationOutcome:
    """Class-conditional (Mondrian) conformal sets: each class is left out of its true set w.p. <= alpha.

    Thresholds come from ``crc_threshold`` per class (the roadwork class on p, the other on 1 - p), so in
    expectation at most alpha of all positives (hence of the roadwork images that exit) miss their class.
    """
    p = np.asarray(p, dtype=float)
    y = np.asarray(y).astype(int)
    t_pos = crc_threshold(p[y == 1], alpha)
    t_neg = crc_threshold(1.0 - p[y == 0], alpha)
    sets = prediction_sets(p, t_pos, t_neg)
    decisions = decisions_from_sets(sets)
    exits = decisions != "defer"
    predictions = (decisions == "roadwork").astype(int)
    k, m = FNROnExits.counts(y, predictions, exits)
    cov = float(exits.mean())
    return CalibrationOutcome(
        method="sets",
        feasible=cov >= xi,
        lam=None,
        tau=None,
        alpha=alpha,
        delta=0.0,
        xi=xi,
        n=int(p.size),
        n_pos=int(np.sum(y == 1)),
        coverage=cov,
        fnr=k / m if m else float("nan"),
        accuracy_on_exits=float(np.mean(predictions[exits] == y[exits])) if exits.any() else float("nan"),
        exited_positives=m,
        misses=k,
        set_thresholds={"roadwork": t_pos, "no_roadwork": t_neg},
        attainable={"avg_set_size": float(sets.sum(axis=1).mean())},
        note="Prediction sets: class-conditional coverage in expectation; size 2 or 0 defers.",
    )


# ------------------------------------------------------------------------------------------------ fit/conformalize
class SelectiveConformal:
    """fit -> conformalize -> predict, in the style of MAPIE.

    Example:
        >>> sc = SelectiveConformal(alpha=0.02, delta=0.1, xi=0.8).fit(g_select)
        >>> outcome = sc.conformalize(p_calib, g_calib, y_calib)
        >>> decisions = sc.predict(p_test, g_test)
    """

    def __init__(
        self,
        alpha: float,
        delta: float,
        xi: float,
        method: str = "scrc",
        grid_size: int = 10,
        delta_coverage_share: float = 0.5,
        objective: str = "accuracy",
    ):
        self.alpha, self.delta, self.xi = alpha, delta, xi
        self.method, self.grid_size = method, grid_size
        self.delta_coverage_share, self.objective = delta_coverage_share, objective
        self.grid_: np.ndarray | None = None
        self.outcome_: CalibrationOutcome | None = None

    def fit(
        self, g_select=None, score_range: tuple[float, float] = (0.0, 1.0), xi: float | None = None
    ) -> SelectiveConformal:
        """Fix the lambda grid before val_calib is seen.

        Args:
            g_select: Selection scores on val_select; the grid is their quantiles at levels [0, 1 - xi].
            score_range: Without ``g_select``: a data-free grid evenly spaced on this score range.
            xi: Lowest exit rate the grid should reach (default the coverage target; pass xi + DKW slack to keep
                every grid point usable).
        """
        xi = self.xi if xi is None else xi
        if g_select is not None and np.asarray(g_select).size:
            self.grid_ = gate_grid_from_scores(g_select, self.grid_size, 0.0, max(1.0 - xi, 0.0))
        else:
            self.grid_ = fixed_gate_grid(self.grid_size, *score_range)
        return self

    def conformalize(self, p, g, y) -> CalibrationOutcome:
        """Choose thresholds on val_calib; the outcome is also kept as ``outcome_``."""
        if self.method == "sets":
            self.outcome_ = conformal_sets(p, y, self.alpha, self.xi)
            return self.outcome_
        if self.grid_ is None:
            self.fit()
        if self.method == "scrc":
            self.outcome_ = scrc_i(
                p, g, y, self.grid_, self.alpha, self.delta, self.xi, self.delta_coverage_share, self.objective
            )
        elif self.method == "crc":
            self.outcome_ = crc(p, g, y, self.grid_, self.alpha, self.xi, self.delta, self.objective)
        else:
            raise ValueError(f"unknown calibration method {self.method!r}; choose scrc, crc or sets")
        return self.outcome_

    def predict(self, p, g) -> np.ndarray:
        """Decisions in {"roadwork", "no_roadwork", "defer"} for calibrated p and selection scores g."""
        if self.outcome_ is None:
            raise RuntimeError("call conformalize() before predict()")
        return decide(self.outcome_.to_dict(), p, g)


def decide(params: dict[str, Any], p, g) -> np.ndarray:
    """Apply thresholds to calibrated p and selection score g.

    ``params`` holds ``tau`` and either ``lam`` (rule "gate", the default when ``rule`` is absent: exit iff
    g >= lam, then roadwork iff p >= tau), ``b`` (rule "band": no_roadwork iff p < tau, roadwork iff p >= b, defer
    in between; g is ignored) or ``set_thresholds`` (prediction sets).
    """
    p = np.asarray(p, dtype=float)
    if params.get("method") == "sets" or params.get("set_thresholds"):
        thresholds = params["set_thresholds"]
        return decisions_from_sets(prediction_sets(p, thresholds["roadwork"], thresholds["no_roadwork"]))
    tau = float(params["tau"])
    if (params.get("rule") or "gate") == "band":
        # p < tau wins over p >= b, though calibration only ever picks tau <= b.
        b = float(params["b"])
        return np.where(p < tau, "no_roadwork", np.where(p >= b, "roadwork", "defer")).astype(str)
    g = np.asarray(g, dtype=float)
    lam = params.get("lam")
    lam = -np.inf if lam is None else float(lam)
    out = np.where(p >= tau, "roadwork", "no_roadwork").astype(object)
    out[~(g >= lam)] = "defer"
    return out.astype(str)
