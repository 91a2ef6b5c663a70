"""Fixtures shared by the calibration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from score_helpers import score_run

from roadwork_cli.io.run import RunDir


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    """A run holding only score files (``score_helpers.score_run``)."""
    return score_run(tmp_path / "run")
