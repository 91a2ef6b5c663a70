"""The guarantee, checked statistically (as MAPIE's long tests do).

A synthetic model with known score distributions: y ~ Bernoulli(0.4), gate g ~ U(0, 1), and
p = sigmoid((2y - 1) * (0.5 + 4 g) + N(0, 1)), so a high gate means an easy image. Many independent calibration sets
are drawn; SCRC-I picks (lambda, tau) on each; the population FNR among exits and the population coverage of that pair
are measured on a 1.5e6-sample population. The frequency of violating (FNR <= alpha AND coverage >= xi) must not
exceed delta beyond binomial noise, and the chosen pairs must stay close to the oracle pair (best pair under the true
distribution).
"""

from __future__ import annotations

import numpy as np
import pytest
from score_helpers import check_risk_step_alone, scrc_gate, simulate_guarantee

from roadwork_cli.calibration.grids import gate_grid_from_scores
from roadwork_cli.calibration.rules import GateRule, Targets
from roadwork_cli.calibration.stats import dkw_slack

ALPHA, DELTA, XI = 0.05, 0.1, 0.8
N_CALIB, N_SELECT, TRIALS = 2000, 1000, 300
GRID_SIZE = 10


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.4).astype(int)
    g = rng.random(n)
    z = (2 * y - 1) * (0.5 + 4 * g) + rng.normal(size=n)
    return 1.0 / (1.0 + np.exp(-z)), g, y


class Population:
    """Exact-enough population rates of any (lambda, tau) pair from a very large sample."""

    def __init__(self, seed: int = 12345, n: int = 1_500_000):
        p, g, y = draw(np.random.default_rng(seed), n)
        order = np.argsort(g)
        self.p, self.g, self.y = p[order], g[order], y[order]
        self.n = n

    def rates(self, lam: float, tau: float) -> tuple[float, float, float]:
        """(FNR among exits, coverage, accuracy among exits)."""
        start = np.searchsorted(self.g, lam, side="left")  # g sorted: exits are the tail
        p, y = self.p[start:], self.y[start:]
        pos = y == 1
        fnr = float(np.mean(p[pos] < tau))
        accuracy = float(np.mean((p >= tau) == (y == 1)))
        return fnr, (self.n - start) / self.n, accuracy

    def oracle_accuracy(self, grid: np.ndarray, taus: np.ndarray) -> float:
        """Best accuracy on exits over pairs that satisfy both targets in the population."""
        best = -1.0
        for lam in grid:
            start = np.searchsorted(self.g, lam, side="left")
            if (self.n - start) / self.n < XI:
                continue
            p, y = self.p[start:], self.y[start:]
            pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
            fnr = np.searchsorted(pos, taus, side="left") / pos.size
            correct = (pos.size - np.searchsorted(pos, taus, side="left")) + np.searchsorted(neg, taus, side="left")
            ok = fnr <= ALPHA
            if ok.any():
                best = max(best, float(np.max(correct[ok]) / (pos.size + neg.size)))
        return best


@pytest.fixture(scope="module")
def population() -> Population:
    return Population()


@pytest.mark.slow
def test_scrc_i_violation_rate_stays_below_delta_and_tracks_the_oracle(population: Population) -> None:
    rng = np.random.default_rng(2024)
    slack = dkw_slack(N_CALIB, DELTA / 2)

    def certify():
        _, g_select, _ = draw(rng, N_SELECT)
        grid = gate_grid_from_scores(g_select, GRID_SIZE, 0.0, 1.0 - XI - slack)  # fixed before val_calib
        return scrc_gate(*draw(rng, N_CALIB), grid, ALPHA, DELTA, XI), grid

    result = simulate_guarantee(TRIALS, certify, lambda rule: population.rates(rule.lam, rule.tau), ALPHA, XI)
    result.assert_violation_rate_at_most(DELTA)
    assert np.mean(result.coverages) >= XI
    assert max(result.fnrs) < 2 * ALPHA  # no pathological pair
    taus = np.linspace(0.0, 1.0, 1001)
    oracle = np.mean([population.oracle_accuracy(grid, taus) for grid in result.grids[:20]])
    # The price of certainty (Bonferroni + DKW) should cost little accuracy on exits at n = 2000.
    assert np.mean(result.accuracies) >= oracle - 0.02, (np.mean(result.accuracies), oracle)
    print(
        f"\nSCRC-I: violation rate {result.rate:.3f} (delta {DELTA}), mean coverage {np.mean(result.coverages):.3f}, "
        f"mean FNR {np.mean(result.fnrs):.4f}, accuracy on exits {np.mean(result.accuracies):.4f} "
        f"vs oracle {oracle:.4f}"
    )


@pytest.mark.slow
def test_plug_in_thresholds_violate_far_more_often_than_delta(population: Population) -> None:
    """Negative control: choosing pairs by empirical FNR/coverage alone breaks the guarantee, so the test has teeth."""
    rng = np.random.default_rng(7)
    violations, trials = 0, 100
    grid = gate_grid_from_scores(draw(rng, N_SELECT)[1], GRID_SIZE, 0.0, 1.0 - XI)
    for _ in range(trials):
        p, g, y = draw(rng, N_CALIB)
        best = None
        for lam in grid:
            exits = g >= lam
            if exits.mean() < XI:
                continue
            pos = np.sort(p[exits & (y == 1)])
            taus = np.unique(p)
            ok = np.searchsorted(pos, taus, side="left") / pos.size <= ALPHA
            tau = float(taus[ok].max())
            accuracy = np.mean((p[exits] >= tau) == (y[exits] == 1))
            if best is None or accuracy > best[0]:
                best = (accuracy, lam, tau)
        fnr, cov, _ = population.rates(best[1], best[2])
        violations += int(fnr > ALPHA or cov < XI)
    print(f"\nplug-in thresholds: violation rate {violations / trials:.3f} (delta {DELTA})")
    assert violations / trials > 2 * DELTA


@pytest.mark.slow
def test_crc_controls_fnr_in_expectation(population: Population) -> None:
    rng = np.random.default_rng(99)
    grid = gate_grid_from_scores(draw(rng, N_SELECT)[1], GRID_SIZE, 0.0, 1.0 - XI)
    fnrs = []
    for _ in range(100):
        p, g, y = draw(rng, 1000)
        outcome = GateRule.certify("crc", p, g, y, grid, Targets(ALPHA, DELTA, XI))
        fnrs.append(population.rates(outcome.rule.lam, outcome.rule.tau)[0])
    # E[FNR] <= alpha; the mean of 100 draws has a standard error of about 0.0015 here.
    assert np.mean(fnrs) <= ALPHA + 0.005
    assert np.mean(fnrs) >= ALPHA - 0.02  # and CRC is not needlessly conservative


@pytest.mark.slow
def test_risk_step_alone_is_valid_and_not_vacuous(population: Population) -> None:
    """With one lambda (everything exits) the binomial fixed-sequence step alone must violate at most delta2 of the
    time, and, being exact, not much less often (otherwise the test above could pass for a too-timid procedure)."""
    rng = np.random.default_rng(5)

    def certify(delta: float, share: float):
        grid = np.array([-np.inf])
        return scrc_gate(*draw(rng, 1000), grid, ALPHA, delta, 0.0, share), grid

    check_risk_step_alone(certify, lambda rule: population.rates(rule.lam, rule.tau), ALPHA, "risk step alone")
