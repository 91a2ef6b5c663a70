"""benchmarks/write_results.py: a regeneration replaces its own RESULTS.md sections and keeps the others."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "write_results.py"


def _load():
    spec = importlib.util.spec_from_file_location("write_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREVIOUS = """# Benchmark results

## Machine

old machine

## End to end vs the bare forward

| old | row |

## Serving (`bench_serve.py`)

served 120 img/s

## Ray Data batch scoring

ratio 0.92
"""

NEW = """# Benchmark results

## Machine

new machine

## End to end vs the bare forward

| new | row |
"""


def test_regeneration_keeps_sections_it_does_not_write_in_their_order():
    merged = _load().keep_other_sections(NEW, PREVIOUS)
    assert "old machine" not in merged and "| old | row |" not in merged  # its own sections are replaced
    assert "new machine" in merged and "| new | row |" in merged
    assert merged.index("## Serving") < merged.index("## Ray Data") and merged.index("| new | row |") < merged.index(
        "## Serving"
    )
    assert "served 120 img/s" in merged and "ratio 0.92" in merged


def test_regenerating_twice_duplicates_nothing():
    write_results = _load()
    once = write_results.keep_other_sections(NEW, PREVIOUS)
    twice = write_results.keep_other_sections(NEW, once)
    assert twice == once
    assert once.count("## Serving") == 1


def test_nothing_to_keep_leaves_the_table_as_rendered():
    assert _load().keep_other_sections(NEW, NEW) == NEW
