"""Score files of a synthetic, miscalibrated model, and the guarantee simulation, shared by the calibration tests."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import binom

from roadwork_cli.io.run import RunDir


def band_counts(pos: np.ndarray, neg: np.ndarray, tau: float, b: float) -> tuple[int, int, int, int]:
    """(misses, true positives, true negatives, false positives) of the band rule (no_roadwork iff p < tau, roadwork
    iff p >= b) over sorted p of the positives and of the negatives."""
    misses = int(np.searchsorted(pos, tau, side="left"))
    tp = int(pos.size - np.searchsorted(pos, b, side="left"))
    tn = int(np.searchsorted(neg, tau, side="left"))
    fp = int(neg.size - np.searchsorted(neg, b, side="left"))
    return misses, tp, tn, fp


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


def score_run(root: Path) -> RunDir:
    """A run with only ``scores/{val_select,val_calib,test}.csv`` (1500 / 2500 / 2000 rows, seeds 1 / 2 / 3)."""
    run = RunDir(root).ensure()
    for split, n, seed in (("val_select", 1500, 1), ("val_calib", 2500, 2), ("test", 2000, 3)):
        write_scores(run.scores / f"{split}.csv", n, seed)
    return run


def binomial_excess_pvalue(violations: int, trials: int, rate: float) -> float:
    """P(Bin(trials, rate) >= violations): small means more violations than `rate` allows."""
    return float(binom.sf(violations - 1, trials, rate))


@dataclass
class Simulation:
    """Population rates of the thresholds chosen on many independent calibration draws (one entry per draw)."""

    fnrs: list[float] = field(default_factory=list)
    coverages: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    grids: list[np.ndarray] = field(default_factory=list)

    def violations(self, alpha: float, xi: float = 0.0) -> int:
        """Draws whose thresholds break FNR <= alpha or coverage >= xi on the population."""
        return sum(int(f > alpha or c < xi) for f, c in zip(self.fnrs, self.coverages, strict=True))

    def assert_guarantee(self, alpha: float, xi: float, delta: float) -> float:
        """One-sided binomial test of H0: violation probability <= delta (fails only if the p-value is tiny), no
        pathological pair, coverage met on average; returns the violation rate."""
        violations, trials = self.violations(alpha, xi), len(self.fnrs)
        rate = violations / trials
        assert binomial_excess_pvalue(violations, trials, delta) > 0.01, f"violation rate {rate:.3f} > delta={delta}"
        assert np.mean(self.coverages) >= xi and max(self.fnrs) < 2 * alpha
        return rate

    def assert_exact(self, alpha: float, delta2: float) -> float:
        """The risk step alone: FNR > alpha at most delta2 of the time and, being exact, not much less often (so a
        too-timid procedure could not pass); returns the violation rate."""
        violations, trials = self.violations(alpha), len(self.fnrs)
        assert binomial_excess_pvalue(violations, trials, delta2) > 0.01
        assert violations / trials > delta2 / 4
        return violations / trials


def simulate(trials: int, draw_once: Callable[[], tuple[float, float, float, np.ndarray]]) -> Simulation:
    """Run ``draw_once`` ``trials`` times; it calibrates on a fresh draw and returns the chosen thresholds' population
    (FNR on exits, coverage, accuracy on exits) and the grid it used."""
    simulation = Simulation()
    for _ in range(trials):
        fnr, coverage, accuracy, grid = draw_once()
        simulation.fnrs.append(fnr)
        simulation.coverages.append(coverage)
        simulation.accuracies.append(accuracy)
        simulation.grids.append(grid)
    return simulation


def scrc_gate(p, g, y, grid, alpha, delta, xi, delta_coverage_share=0.5, objective="accuracy"):
    """SCRC-I for the gate rule with positional targets (as the statistical tests call it)."""
    from roadwork_cli.calibration.rules import GateRule
    from roadwork_cli.calibration.targets import Targets

    return GateRule.certify("scrc", p, g, y, grid, Targets(alpha, delta, xi, delta_coverage_share, objective))


def scrc_band(p, y, grid, alpha, delta, xi, delta_coverage_share=0.5, objective="accuracy"):
    """SCRC-I for the band rule with positional targets."""
    from roadwork_cli.calibration.rules import BandRule
    from roadwork_cli.calibration.targets import Targets

    return BandRule.certify("scrc", p, None, y, grid, Targets(alpha, delta, xi, delta_coverage_share, objective))
