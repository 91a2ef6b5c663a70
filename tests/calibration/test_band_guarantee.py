"""The band rule's guarantee, checked statistically (same style as test_guarantee.py).

Synthetic model with known score distributions: y ~ Bernoulli(0.4), p = sigmoid((2y - 1) * (0.5 + 4 u) + N(0, 1)) with
u ~ U(0, 1) unseen by the rule. Many independent val_select/val_calib draws; each fixes the b grid on val_select and
runs ``scrc_band`` on val_calib; the chosen (b, tau) is scored on a 1.5e6-sample population. The frequency of violating
(FNR on exits <= alpha AND coverage >= xi) must not exceed delta beyond binomial noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from score_helpers import band_counts, scrc_band, simulate

from roadwork_cli.calibration.grids import band_grid_from_scores
from roadwork_cli.calibration.stats import dkw_slack

ALPHA, DELTA, XI = 0.05, 0.1, 0.8
N_CALIB, N_SELECT, TRIALS = 2000, 1000, 300
GRID_SIZE = 10


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.4).astype(int)
    z = (2 * y - 1) * (0.5 + 4 * rng.random(n)) + rng.normal(size=n)
    return 1.0 / (1.0 + np.exp(-z)), y


class Population:
    """Population rates of any band (b, tau) from a very large sample, via sorted p per class."""

    def __init__(self, seed: int = 54321, n: int = 1_500_000):
        p, y = draw(np.random.default_rng(seed), n)
        self.pos, self.neg, self.n = np.sort(p[y == 1]), np.sort(p[y == 0]), n

    def rates(self, b: float, tau: float) -> tuple[float, float, float]:
        """(FNR among exits, coverage, accuracy among exits) of: no_roadwork iff p < tau, roadwork iff p >= b."""
        misses, tp, tn, fp = band_counts(self.pos, self.neg, tau, b)
        n_exit = misses + tp + tn + fp
        fnr = misses / (misses + tp) if misses + tp else 0.0
        return float(fnr), n_exit / self.n, (tp + tn) / n_exit if n_exit else float("nan")

    def oracle_accuracy(self, grid: np.ndarray, taus: np.ndarray = np.linspace(0.0, 1.0, 1001)) -> float:
        """Best population accuracy on exits over bands (b in grid, tau <= b) that meet both targets."""
        best = -1.0
        for b in grid:
            for tau in taus[taus <= b]:
                fnr, cov, accuracy = self.rates(float(b), float(tau))
                if fnr <= ALPHA and cov >= XI:
                    best = max(best, accuracy)
        return best


@pytest.fixture(scope="module")
def population() -> Population:
    return Population()


@pytest.mark.slow
def test_band_violation_rate_stays_below_delta(population: Population) -> None:
    rng = np.random.default_rng(2025)
    slack = dkw_slack(N_CALIB, DELTA / 2 / GRID_SIZE)

    def draw_once():
        p_select, y_select = draw(rng, N_SELECT)
        grid = band_grid_from_scores(p_select, y_select, GRID_SIZE, XI + slack, ALPHA)  # fixed before val_calib
        p, y = draw(rng, N_CALIB)
        outcome = scrc_band(p, y, grid, ALPHA, DELTA, XI)
        assert outcome.feasible, outcome.note
        assert outcome.rule.tau <= outcome.rule.b
        return (*population.rates(outcome.rule.b, outcome.rule.tau), grid)

    simulation = simulate(TRIALS, draw_once)
    rate = simulation.assert_guarantee(ALPHA, XI, DELTA)
    # The price of certainty (Bonferroni over B for both bounds) should cost little accuracy on exits at n = 2000.
    oracle = np.mean([population.oracle_accuracy(grid) for grid in simulation.grids[:20]])
    accuracy = np.mean(simulation.accuracies)
    assert accuracy >= oracle - 0.02, (accuracy, oracle)
    print(
        f"\nband SCRC-I: violation rate {rate:.3f} (delta {DELTA}), mean coverage {np.mean(simulation.coverages):.3f}, "
        f"mean FNR {np.mean(simulation.fnrs):.4f}, accuracy on exits {accuracy:.4f} vs oracle {oracle:.4f}"
    )


@pytest.mark.slow
def test_band_risk_step_alone_is_valid_and_not_vacuous(population: Population) -> None:
    """One b, xi = 0 and the largest certified tau (objective coverage): only the fixed-sequence binomial step is at
    work; it must violate at most delta2 of the time and, being exact, not much less often (so the test above could
    not pass for a too-timid procedure)."""
    rng = np.random.default_rng(6)
    delta, share, trials = 0.4, 0.5, 400  # delta2 = 0.2: large enough to count violations precisely
    one_b = np.array([0.9])

    def draw_once():
        p, y = draw(rng, 1000)
        outcome = scrc_band(p, y, one_b, ALPHA, delta, 0.0, share, objective="coverage")
        return (*population.rates(outcome.rule.b, outcome.rule.tau), one_b)

    delta2 = delta * (1 - share)
    rate = simulate(trials, draw_once).assert_exact(ALPHA, delta2)
    print(f"\nband risk step alone: violation rate {rate:.3f} (delta2 {delta2})")


def plug_in_band(p: np.ndarray, y: np.ndarray, grid: np.ndarray) -> tuple[float, float]:
    """The (b, tau) of largest EMPIRICAL coverage whose empirical FNR <= alpha (no bounds, no corrections)."""
    best = (-1.0, float(grid[-1]), 0.0)
    for b in grid:
        taus = np.unique(np.append(p[p < b], b))
        exits = (p[None, :] < taus[:, None]) | (p[None, :] >= b)  # (T, n)
        pos = exits & (y == 1)
        fnr = (pos & (p < taus[:, None])).sum(axis=1) / np.maximum(pos.sum(axis=1), 1)
        coverage = exits.mean(axis=1)
        ok = fnr <= ALPHA
        if ok.any() and coverage[ok].max() > best[0]:
            j = int(np.flatnonzero(ok)[np.argmax(coverage[ok])])
            best = (float(coverage[j]), float(b), float(taus[j]))
    return best[1], best[2]


@pytest.mark.slow
def test_plug_in_band_violates_far_more_often_than_delta(population: Population) -> None:
    """Negative control: the widest-exit band by empirical FNR alone breaks the guarantee (the tests have teeth)."""
    rng = np.random.default_rng(8)
    grid = np.array([0.9, 0.95])  # b where even tau = b misses more than alpha, so the FNR bound binds
    violations, trials = 0, 60
    for _ in range(trials):
        p, y = draw(rng, N_CALIB // 2)
        violations += int(population.rates(*plug_in_band(p, y, grid))[0] > ALPHA)
    print(f"\nplug-in band: FNR violation rate {violations / trials:.3f} (delta {DELTA})")
    assert violations / trials > 2 * DELTA
