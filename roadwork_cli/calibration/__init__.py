"""Calibration with a guarantee: probability scaling (scaling.py), exact statistics (stats.py), grids (grids.py),
targets, methods and outcomes (targets.py), the certification methods (certify.py), the gate / band / sets rules
behind one registry (rules.py), the one estimator fit -> conformalize -> predict -> save/load (estimator.py) and the
library entry points (api.py).

Everything here is numpy/scipy only (no torch), so calibrating any model's scores CSV starts fast.
"""

from roadwork_cli.calibration.estimator import SelectiveConformal
from roadwork_cli.calibration.rules import (
    BandRule,
    GateRule,
    SetsRule,
    create_rule,
    list_rules,
    rule_class,
)
from roadwork_cli.calibration.scaling import create_scaler, list_scalers, scaler_from_dict
from roadwork_cli.calibration.stats import positives_needed
from roadwork_cli.calibration.targets import CalibrationOutcome, Targets, create_method, list_methods

__all__ = [
    "BandRule",
    "CalibrationOutcome",
    "GateRule",
    "SelectiveConformal",
    "SetsRule",
    "Targets",
    "create_method",
    "create_rule",
    "create_scaler",
    "list_methods",
    "list_rules",
    "list_scalers",
    "positives_needed",
    "rule_class",
    "scaler_from_dict",
]
