"""Calibration with a guarantee: probability scaling (scaling.py), exact statistics (stats.py), grids (grids.py),
the gate / band / sets rules and their certification methods behind one registry (rules.py), the stage rule facade
(rule.py) and the library entry points (api.py).

Everything here is numpy/scipy only (no torch), so calibrating any model's scores CSV starts fast.
"""

from roadwork_cli.calibration.rule import StageRule
from roadwork_cli.calibration.rules import (
    BandRule,
    CalibrationOutcome,
    Coverage,
    FNROnExits,
    GateRule,
    SelectiveConformal,
    SetsRule,
    Targets,
    crc_threshold,
    create_method,
    create_rule,
    list_methods,
    list_rules,
)
from roadwork_cli.calibration.scaling import create_scaler, list_scalers, scaler_from_dict
from roadwork_cli.calibration.stats import positives_needed

__all__ = [
    "BandRule",
    "CalibrationOutcome",
    "Coverage",
    "FNROnExits",
    "GateRule",
    "SelectiveConformal",
    "SetsRule",
    "StageRule",
    "Targets",
    "create_method",
    "create_rule",
    "create_scaler",
    "crc_threshold",
    "list_methods",
    "list_rules",
    "list_scalers",
    "positives_needed",
    "scaler_from_dict",
]
