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

    ``lam`` / ``tau`` are None in prediction-set mode, which uses ``set_thresholds`` instead.
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
    n_exit = table["n_exit"]
    if n_exit == 0:
        return np.full(table["k"].shape, -np.inf)
    if objective == "accuracy":
        return (table["tp"] + table["tn"]) / n_exit
    if objective == "coverage":
        return np.full(table["k"].shape, n_exit / n)
    if objective == "mcc":
        tp, tn, fp, fn = (table[key].astype(float) for key in ("tp", "tn", "fp", "k"))
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, (tp * tn - fp * fn) / denominator, 0.0)
    raise ValueError(f"unknown objective {objective!r}; choose accuracy, coverage or mcc")


def _check_inputs(p, g, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=float).reshape(-1)
    g = np.asarray(g, dtype=float).reshape(-1)
    y = np.asarray(y).astype(int).reshape(-1)
    if not (p.size == g.size == y.size):
        raise ValueError("p, g and y must have the same length")
    if p.size == 0:
        raise ValueError("calibration needs at least one val_calib sample")
    return p, g, y


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
        pvalues = binomial_pvalue(table["k"], m, alpha)
        # Fixed sequence: certified = the prefix of taus before the first non-rejected hypothesis.
        rejected = pvalues <= level
        n_cert = int(np.argmin(rejected)) if not rejected.all() else rejected.size
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
    k, m, n_exit = int(table["k"][j]), int(table["m"][j]), int(table["n_exit"])
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
        coverage=chosen["cov"],
        coverage_lower=max(chosen["cov"] - slack, 0.0),
        fnr=k / m if m else float("nan"),
        fnr_upper=float(clopper_pearson_upper(k, m, level)),
        accuracy_on_exits=(int(table["tp"][j]) + int(table["tn"][j])) / n_exit if n_exit else float("nan"),
        exited_positives=m,
        misses=k,
        certified_pairs=certified_total,
        attainable={
            "best_fnr_upper_at_coverage": best_fnr_upper_at_xi,
            "max_coverage_lower_at_fnr": max_cov_lower_at_alpha,
        },
        per_lambda=per_lambda,
        note="" if feasible else _infeasible_note(alpha, xi, best_fnr_upper_at_xi, max_cov_lower_at_alpha),
    )
    return outcome


def _infeasible_note(alpha: float, xi: float, fnr_at_xi: float | None, cov_at_alpha: float | None) -> str:
    parts = [f"No threshold pair certifies FNR <= {alpha:g} with coverage >= {xi:g}."]
    if fnr_at_xi is not None:
        parts.append(f"At coverage {xi:g} the best certifiable FNR bound is {fnr_at_xi:.4f}.")
    else:
        parts.append(f"No gate threshold certifies coverage {xi:g} on this many images.")
    if cov_at_alpha is not None:
        parts.append(f"At FNR {alpha:g} the largest certified coverage is {cov_at_alpha:.4f}.")
    else:
        parts.append(f"No gate threshold certifies FNR {alpha:g} (too few exited positives).")
    return " ".join(parts)


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
    """Apply thresholds from a params dict (scrc_params.json) to calibrated p and selection score g."""
    p = np.asarray(p, dtype=float)
    if params.get("method") == "sets" or params.get("set_thresholds"):
        thresholds = params["set_thresholds"]
        return decisions_from_sets(prediction_sets(p, thresholds["roadwork"], thresholds["no_roadwork"]))
    g = np.asarray(g, dtype=float)
    lam = params.get("lam")
    lam = -np.inf if lam is None else float(lam)
    tau = float(params["tau"])
    out = np.where(p >= tau, "roadwork", "no_roadwork").astype(object)
    out[~(g >= lam)] = "defer"
    return out.astype(str)
