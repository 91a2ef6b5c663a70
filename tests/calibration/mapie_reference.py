"""Our SCRC-I certificate next to MAPIE's Learn-then-Test controller, on the same calibration draws and grids.

Used by ``tests/calibration/test_mapie_reference.py`` and ``benchmarks/bench_mapie_reference.py``; needs ``mapie``
(a test-only dependency, the ``dev`` extra).

MAPIE side (``mapie.risk_control.BinaryClassificationController``, MAPIE >= 1.5):

- The two thresholds are a multi-dimensional parameter: ``predict_function(X, *pair)`` returns 1 (roadwork), 0
  (no_roadwork) or NaN (defer) per image, X = the (n, 2) array of (p, g).
- FNR on exits is a ``BinaryRisk``: occurrence "decided no_roadwork", condition "a positive that exited" (a NaN
  prediction is neither), so its empirical value is k / m over the m exited positives, with m as the effective sample
  size: the same ratio risk as ours.
- Coverage >= xi is MAPIE's ``abstention_rate`` <= 1 - xi.
- Both risks are controlled together (multi-risk: the p-value of a pair is the larger of the two, an
  intersection-union test at the full delta), with Bonferroni-Holm over every pair or a fixed sequence learned on
  val_select (``split_fixed_sequence``); MAPIE refuses plain ``fixed_sequence`` for two risks or two thresholds.
- The pair is then chosen by the largest accuracy on exits (a ``BinaryRisk`` used as ``best_predict_param_choice``),
  our default objective.

Population model: that of ``test_guarantee.py`` (y ~ Bernoulli(0.4), g ~ U(0, 1),
p = sigmoid((2y - 1)(0.5 + 4g) + N(0, 1))); the band rule ignores g.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from score_helpers import band_counts, scrc_band, scrc_gate
from test_guarantee import draw

from roadwork_cli.calibration.grids import band_grid_from_scores, gate_grid_from_scores, tau_candidates
from roadwork_cli.calibration.stats import dkw_slack

MAPIE_VARIANTS = ("holm", "split_fixed_sequence")
"""MAPIE's FWER procedures compared (``bonferroni`` is dominated by Holm; ``fixed_sequence`` is refused)."""


# ------------------------------------------------------------------------------------------------ MAPIE risks
def mapie_risks():
    """(FNR on exits, abstention rate, accuracy on exits) as MAPIE ``BinaryRisk``s; a deferral is a NaN prediction."""
    from mapie.risk_control import BinaryRisk, abstention_rate

    fnr_on_exits = BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: y_pred == 0,  # NaN == 0 is False: a deferral is never a miss
        risk_condition=lambda y_true, y_pred: (y_true == 1) & (y_pred == y_pred),  # exited positives
        higher_is_better=False,
    )
    accuracy_on_exits = BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: y_pred == y_true,
        risk_condition=lambda y_true, y_pred: y_pred == y_pred,
        higher_is_better=True,
    )
    return fnr_on_exits, abstention_rate, accuracy_on_exits


def gate_predict(X, lam, tau) -> np.ndarray:
    """Gate rule as a MAPIE predict function: X[:, 0] = p, X[:, 1] = g; NaN = defer."""
    p, g = X[:, 0], X[:, 1]
    return np.where(g >= lam, (p >= tau).astype(float), np.nan)


def band_predict(X, tau, b) -> np.ndarray:
    """Band rule as a MAPIE predict function: no_roadwork iff p < tau, roadwork iff p >= b; NaN = defer."""
    p = X[:, 0]
    return np.where(p < tau, 0.0, np.where(p >= b, 1.0, np.nan))


def gate_pairs(lambdas: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """(|lambda| * |tau|, 2) pairs, lambda-major."""
    return np.array([(lam, tau) for lam in lambdas for tau in taus], dtype=float)


def band_pairs(bs: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """(tau, b) pairs with tau < b, plus tau = b (the empty band) per b."""
    return np.array([(tau, b) for b in bs for tau in [*taus[taus < b], b]], dtype=float)


def mapie_controller(rule: str, pairs: np.ndarray, alpha: float, delta: float, xi: float, fwer: str):
    """A MAPIE controller for ``rule`` over ``pairs`` with both targets as risks (``fwer``: "holm" or
    "split_fixed_sequence")."""
    from mapie.risk_control import BinaryClassificationController

    fnr_on_exits, abstention, accuracy_on_exits = mapie_risks()
    return BinaryClassificationController(
        predict_function=gate_predict if rule == "gate" else band_predict,
        risk=[fnr_on_exits, abstention],
        target_level=[alpha, 1.0 - xi],
        confidence_level=1.0 - delta,
        best_predict_param_choice=accuracy_on_exits,
        list_predict_params=pairs,
        fwer_method="bonferroni_holm" if fwer == "holm" else "split_fixed_sequence",
    )


# ------------------------------------------------------------------------------------ a sketch, not the product
def iut_gate(p, g, y, lambdas: np.ndarray, taus: np.ndarray, alpha: float, delta: float, xi: float):
    """What MAPIE's coverage construction would give our gate certificate (measured only; not in the product).

    Per pair the p-value of H0 "FNR > alpha or coverage < xi" is max(exact binomial FNR p-value, exact binomial
    coverage p-value P(Bin(n, xi) >= exits)); at each lambda a fixed sequence up tau (the union null is upward closed
    in tau: coverage does not depend on it, FNR grows with it), Bonferroni over lambda at delta / |G|: no delta split,
    no DKW. Returns ((lambda, tau) of the most accurate certified pair or None, certified pairs on ``taus``).
    """
    from scipy.special import bdtr

    from roadwork_cli.calibration.certify import exit_pair_table
    from roadwork_cli.calibration.groups import fixed_sequence_prefix
    from roadwork_cli.calibration.stats import binomial_pvalue

    level, n, best, count = delta / len(lambdas), p.size, None, 0
    for lam in lambdas:
        exits = g >= lam
        n_exit = int(exits.sum())
        p_cov = 1.0 - bdtr(n_exit - 1, n, xi) if n_exit > 0 else 1.0
        candidates = np.union1d(tau_candidates(p), taus)
        table = exit_pair_table(p, y, exits, candidates)
        pvalues = np.maximum(binomial_pvalue(table["k"], table["m"], alpha), p_cov)
        certified = fixed_sequence_prefix(pvalues, level)
        if certified == 0:
            continue
        count += int(np.sum(taus <= candidates[certified - 1]))
        accuracy = (table["tp"][:certified] + table["tn"][:certified]) / max(n_exit, 1)
        j = int(np.argmax(accuracy))
        if best is None or accuracy[j] > best[0]:
            best = (float(accuracy[j]), (float(lam), float(candidates[j])))
    return (None if best is None else best[1]), count


# ------------------------------------------------------------------------------------------------- population
class Population:
    """Population rates of gate (lambda, tau) and band (tau, b) pairs from a very large sample."""

    def __init__(self, seed: int = 12345, n: int = 1_000_000):
        p, g, y = draw(np.random.default_rng(seed), n)
        order = np.argsort(g)
        self.p, self.g, self.y, self.n = p[order], g[order], y[order], n
        self.pos, self.neg = np.sort(p[y == 1]), np.sort(p[y == 0])

    def gate(self, lam: float, tau: float) -> tuple[float, float, float]:
        """(FNR on exits, coverage, accuracy on exits) of: exit iff g >= lam, then roadwork iff p >= tau."""
        start = np.searchsorted(self.g, lam, side="left")
        p, y = self.p[start:], self.y[start:]
        return float(np.mean(p[y == 1] < tau)), (self.n - start) / self.n, float(np.mean((p >= tau) == (y == 1)))

    def band(self, tau: float, b: float) -> tuple[float, float, float]:
        """(FNR on exits, coverage, accuracy on exits) of: no_roadwork iff p < tau, roadwork iff p >= b."""
        misses, tp, tn, fp = band_counts(self.pos, self.neg, tau, b)
        exits = misses + tp + tn + fp
        return misses / max(misses + tp, 1), exits / self.n, (tp + tn) / max(exits, 1)

    def rates(self, rule: str, pair) -> tuple[float, float, float]:
        """Rates of a (lambda, tau) gate pair or a (tau, b) band pair."""
        return self.gate(*pair) if rule == "gate" else self.band(*pair)


# --------------------------------------------------------------------------------------------- one comparison
@dataclass
class Setting:
    """One simulated setting: targets, sizes, grids."""

    rule: str = "gate"
    alpha: float = 0.05
    delta: float = 0.1
    xi: float = 0.8
    n_calib: int = 2000
    n_select: int = 1000
    grid_size: int = 10
    tau_grid_size: int = 30


@dataclass
class Grids:
    """Everything fixed on val_select before any calibration draw: the outer grid, the common tau grid, the pairs
    MAPIE tests, and (for split fixed sequence) the select data to learn its order on."""

    outer: np.ndarray
    taus: np.ndarray
    pairs: np.ndarray
    X_select: np.ndarray
    y_select: np.ndarray


def make_grids(setting: Setting, rng: np.random.Generator) -> Grids:
    """The outer grid exactly as our rule builds it from val_select; the common tau grid = 0 and the val_select
    positives' p quantiles at levels up to 4 alpha (where the FNR boundary lies: a focused grid helps Holm, whose
    levels shrink with every hypothesis that cannot be rejected)."""
    p, g, y = draw(rng, setting.n_select)
    slack = dkw_slack(setting.n_calib, setting.delta / 2)
    if setting.rule == "gate":
        outer = gate_grid_from_scores(g, setting.grid_size, 0.0, 1.0 - setting.xi - slack)
    else:
        outer = band_grid_from_scores(p, y, setting.grid_size, setting.xi + slack, setting.alpha)
    levels = np.linspace(0.0, min(4 * setting.alpha, 1.0), setting.tau_grid_size - 1)
    taus = np.unique(np.concatenate([[0.0], np.quantile(p[y == 1], levels)]))
    pairs = gate_pairs(outer, taus) if setting.rule == "gate" else band_pairs(outer, taus)
    return Grids(outer, taus, pairs, np.column_stack([p, g]), y)


def ours_on_grid(rule: str, outcome, taus: np.ndarray) -> int:
    """How many pairs of the common grid our certificate covers: per outer value, the taus inside its certified
    prefix (and, for band, at or above the smallest tau whose coverage passed; tau <= b)."""
    count = 0
    for record in outcome.per_grid:
        if not record["coverage_ok"] or record["max_certified_tau"] is None:
            continue
        ok = taus <= record["max_certified_tau"]
        if rule == "band":
            b = record["b"]
            grid_taus = np.append(taus[taus < b], b)
            ok = (grid_taus <= record["max_certified_tau"]) & (grid_taus >= record["min_tau_coverage_ok"])
        count += int(ok.sum())
    return count


@dataclass
class Draws:
    """Per method, one entry per calibration draw: population (FNR, coverage, accuracy) of the chosen pair (None if
    nothing was certified) and the number of certified pairs on the common grid."""

    rates: dict[str, list] = field(default_factory=dict)
    certified: dict[str, list] = field(default_factory=dict)

    def add(self, method: str, rates, certified: int) -> None:
        self.rates.setdefault(method, []).append(rates)
        self.certified.setdefault(method, []).append(certified)

    def summary(self, method: str, alpha: float, xi: float) -> dict[str, float]:
        """Violation rate of "FNR <= alpha and coverage >= xi" (an uncertified draw violates nothing: it defers
        everything and claims nothing), certified share, mean certified pairs, mean accuracy / coverage when
        certified."""
        rates = self.rates[method]
        chosen = [r for r in rates if r is not None]
        return {
            "draws": len(rates),
            "violation_rate": sum(int(f > alpha or c < xi) for f, c, _ in chosen) / len(rates),
            "certified_share": len(chosen) / len(rates),
            "mean_certified_pairs": float(np.mean(self.certified[method])),
            "mean_accuracy_on_exits": float(np.mean([a for _, _, a in chosen])) if chosen else float("nan"),
            "mean_coverage": float(np.mean([c for _, c, _ in chosen])) if chosen else float("nan"),
            "mean_fnr_on_exits": float(np.mean([f for f, _, _ in chosen])) if chosen else float("nan"),
            **self.paired(method),
        }

    def paired(self, method: str, reference: str = "ours") -> dict[str, float]:
        """Per-draw differences ``method`` - ``reference`` (same calibration data): certified pairs, and population
        accuracy on exits over the draws where both certified; mean and standard error of each."""
        out: dict[str, float] = {}
        pairs = np.subtract(self.certified[method], self.certified[reference], dtype=float)
        both = [(a[2], b[2]) for a, b in zip(self.rates[method], self.rates[reference], strict=True) if a and b]
        accuracy = np.array([a - b for a, b in both]) if both else np.array([np.nan])
        for name, diff in (("pairs", pairs), ("accuracy", accuracy)):
            out[f"{name}_minus_{reference}"] = float(np.mean(diff))
            out[f"{name}_minus_{reference}_se"] = (
                float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
            )
        return out


def compare(setting: Setting, trials: int, seed: int, population: Population, variants=MAPIE_VARIANTS,
            draws_per_grid: int = 20, iut: bool = False) -> Draws:  # fmt: skip
    """``trials`` calibration draws; on each, ours and every MAPIE variant choose a pair on the same data. A fresh
    val_select (hence fresh grids and a freshly learned MAPIE sequence) every ``draws_per_grid`` draws, so that the
    figures average over grids too. ``iut``: also run ``iut_gate`` (gate rule only)."""
    rng = np.random.default_rng(seed)
    draws = Draws()
    for trial in range(trials):
        if trial % draws_per_grid == 0:
            grids = make_grids(setting, rng)
            controllers = {v: mapie_controller(setting.rule, grids.pairs, setting.alpha, setting.delta, setting.xi, v)
                           for v in variants}  # fmt: skip
            if "split_fixed_sequence" in controllers:  # the order is learned on val_select, never on val_calib
                controllers["split_fixed_sequence"].learn_fixed_sequence_order(
                    grids.X_select, grids.y_select, beta_grid=np.logspace(-25, 0, 200)
                )
        p, g, y = draw(rng, setting.n_calib)
        if setting.rule == "gate":
            outcome = scrc_gate(p, g, y, grids.outer, setting.alpha, setting.delta, setting.xi)
            pair = (outcome.rule.lam, outcome.rule.tau)
        else:
            outcome = scrc_band(p, y, grids.outer, setting.alpha, setting.delta, setting.xi)
            pair = (outcome.rule.tau, outcome.rule.b)
        rates = population.rates(setting.rule, pair) if outcome.feasible else None
        draws.add("ours", rates, ours_on_grid(setting.rule, outcome, grids.taus))
        if iut and setting.rule == "gate":
            pair, count = iut_gate(p, g, y, grids.outer, grids.taus, setting.alpha, setting.delta, setting.xi)
            draws.add("ours_iut_sketch", None if pair is None else population.gate(*pair), count)
        X = np.column_stack([p, g])
        for name, controller in controllers.items():
            controller.calibrate(X, y)
            best = controller.best_predict_param
            rates = None if best is None else population.rates(setting.rule, best)
            draws.add(f"mapie_{name}", rates, len(controller.valid_predict_params))
    return draws
