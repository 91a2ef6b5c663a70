"""Fixtures of tests/features: see cache_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from cache_helpers import make_run

from roadwork_cli.io.run import RunDir


@pytest.fixture
def tiny_run(tmp_path: Path) -> RunDir:
    return make_run(tmp_path)
