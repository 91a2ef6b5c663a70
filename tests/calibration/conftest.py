"""Fixtures shared by the calibration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from score_helpers import write_scores

from roadwork_cli.io.run import RunDir


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    """A run holding only score files: val_select 1500, val_calib 2500 and test 2000 rows of a miscalibrated model."""
    run = RunDir(tmp_path / "run").ensure()
    write_scores(run.scores / "val_select.csv", 1500, 1)
    write_scores(run.scores / "val_calib.csv", 2500, 2)
    write_scores(run.scores / "test.csv", 2000, 3)
    return run
