"""Calibration with a guarantee: probability scaling (scaling.py), SCRC-I / CRC / sets (scrc.py), the stage rule.

Everything here is numpy/scipy only (no torch), so calibrating any model's scores CSV starts fast.
"""

from roadwork_cli.calibration.rule import StageRule
from roadwork_cli.calibration.scaling import create_scaler, list_scalers, scaler_from_dict
from roadwork_cli.calibration.scrc import (
    CalibrationOutcome,
    Coverage,
    FNROnExits,
    SelectiveConformal,
    crc,
    crc_threshold,
    scrc_band,
    scrc_i,
)

__all__ = [
    "CalibrationOutcome",
    "Coverage",
    "FNROnExits",
    "SelectiveConformal",
    "StageRule",
    "create_scaler",
    "crc",
    "crc_threshold",
    "list_scalers",
    "scaler_from_dict",
    "scrc_band",
    "scrc_i",
]
