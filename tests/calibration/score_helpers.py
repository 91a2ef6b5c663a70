"""Shared by the calibration tests: score files of a synthetic, miscalibrated model and the guarantee simulation."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binom


def write_scores(path: Path, n: int, seed: int, temperature: float = 2.0) -> Path:
    """Scores of a synthetic, miscalibrated model (logits scaled by `temperature`)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    gate_logit = rng.normal(0, 1.5, n)
    z = (2 * y - 1) * (1 + 2.5 / (1 + np.exp(-gate_logit))) * 1.5 + rng.normal(size=n)
    p = 1 / (1 + np.exp(-temperature * z))
    gate = 1 / (1 + np.exp(-gate_logit))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "p_roadwork", "gate", "logit_aux"])
        for i in range(n):
            writer.writerow([f"{seed}-{i}", y[i], f"{p[i]:.8f}", f"{gate[i]:.8f}", "0.0"])
    return path


def binomial_excess_pvalue(violations: int, trials: int, rate: float) -> float:
    """P(Bin(trials, rate) >= violations): small means more violations than `rate` allows."""
    return float(binom.sf(violations - 1, trials, rate))


def scrc_gate(p, g, y, grid, alpha, delta, xi, delta_coverage_share=0.5, objective="accuracy"):
    """SCRC-I for the gate rule with positional targets (as the statistical tests call it)."""
    from roadwork_cli.calibration.rules import GateRule, Targets

    return GateRule.certify("scrc", p, g, y, grid, Targets(alpha, delta, xi, delta_coverage_share, objective))


def scrc_band(p, y, grid, alpha, delta, xi, delta_coverage_share=0.5, objective="accuracy"):
    """SCRC-I for the band rule with positional targets."""
    from roadwork_cli.calibration.rules import BandRule, Targets

    return BandRule.certify("scrc", p, None, y, grid, Targets(alpha, delta, xi, delta_coverage_share, objective))


@dataclass
class GuaranteeTrials:
    """What many independent calibrations chose, scored on the population (see :func:`simulate_guarantee`)."""

    trials: int
    violations: int = 0
    fnrs: list[float] = field(default_factory=list)
    coverages: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    grids: list[np.ndarray] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.violations / self.trials

    def assert_violation_rate_at_most(self, delta: float) -> None:
        """One-sided binomial test of H0: violation probability <= delta; the guarantee fails only if p is tiny."""
        assert binomial_excess_pvalue(self.violations, self.trials, delta) > 0.01, (
            f"violation rate {self.rate:.3f} > delta={delta}"
        )


def simulate_guarantee(
    trials: int,
    certify: Callable[[], tuple[Any, np.ndarray]],
    rates: Callable[[Any], tuple[float, float, float]],
    alpha: float,
    xi: float,
    require_feasible: bool = True,
) -> GuaranteeTrials:
    """Calibrate ``trials`` times and count how often the chosen rule misses "FNR on exits <= alpha and coverage >= xi".

    Args:
        trials: Number of independent calibrations.
        certify: Draws fresh data and calibrates: returns (outcome, grid) for one trial.
        rates: The population's (FNR among exits, coverage, accuracy among exits) of an outcome's rule.
        alpha: FNR target.
        xi: Coverage target (0 checks the FNR alone).
        require_feasible: Fail on an infeasible outcome (the data are drawn so that every trial should certify).
    """
    result = GuaranteeTrials(trials)
    for _ in range(trials):
        outcome, grid = certify()
        assert outcome.feasible or not require_feasible, outcome.note
        fnr, coverage, accuracy = rates(outcome.rule)
        result.violations += int(fnr > alpha or coverage < xi)
        result.fnrs.append(fnr)
        result.coverages.append(coverage)
        result.accuracies.append(accuracy)
        result.grids.append(grid)
    return result


def check_risk_step_alone(
    certify: Callable[[float, float], tuple[Any, np.ndarray]],
    rates: Callable[[Any], tuple[float, float, float]],
    alpha: float,
    label: str,
) -> GuaranteeTrials:
    """The fixed-sequence binomial step alone (one exit set, xi = 0) violates at most delta2 and, exact, not far less.

    ``certify(delta, share)`` draws fresh data and calibrates with that delta and coverage share; delta 0.4 and share
    0.5 give delta2 = 0.2, large enough to count violations precisely over 400 trials. The lower bound (rate >
    delta2 / 4) keeps the validity tests from passing for a too-timid procedure.
    """
    delta, share, trials = 0.4, 0.5, 400
    result = simulate_guarantee(trials, lambda: certify(delta, share), rates, alpha, 0.0, require_feasible=False)
    delta2 = delta * (1 - share)
    result.assert_violation_rate_at_most(delta2)
    assert result.rate > delta2 / 4
    print(f"\n{label}: violation rate {result.rate:.3f} (delta2 {delta2})")
    return result
