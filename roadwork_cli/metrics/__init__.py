"""Metrics of single-stage and selective classification (numpy; sklearn imported lazily)."""

from roadwork_cli.metrics.classification import (
    ReliabilityBins,
    accuracy,
    auroc,
    brier,
    ece,
    mcc,
    nll,
    reliability_bins,
)
from roadwork_cli.metrics.selective import (
    RiskCoverageCurve,
    accuracy_on_exits,
    aurc,
    avg_set_size,
    coverage,
    coverage_at_risk,
    e_aurc,
    fnr_on_exits,
    fpr_on_exits,
    optimal_aurc,
    risk_at_coverage,
    risk_coverage_curve,
)

__all__ = [
    "ReliabilityBins",
    "RiskCoverageCurve",
    "accuracy",
    "accuracy_on_exits",
    "auroc",
    "aurc",
    "avg_set_size",
    "brier",
    "coverage",
    "coverage_at_risk",
    "e_aurc",
    "ece",
    "fnr_on_exits",
    "fpr_on_exits",
    "mcc",
    "nll",
    "optimal_aurc",
    "reliability_bins",
    "risk_at_coverage",
    "risk_coverage_curve",
]
