"""Fixtures of tests/training: see train_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import make_cached_run

from roadwork_cli.io.run import RunDir


@pytest.fixture
def cached_run(tmp_path: Path) -> RunDir:
    return make_cached_run(tmp_path / "run")
