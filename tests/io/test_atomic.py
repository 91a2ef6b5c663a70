"""Atomic writes: whole files or nothing, with the mode a plain open() would give under the umask."""

from __future__ import annotations

import os
import stat

import pytest

from roadwork_cli.io.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json


@pytest.fixture
def umask():
    """Set a umask for one test and put the old one back."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_files_follow_the_umask_like_open(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as handle:
        handle.write("x")
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~mask

    written = [
        atomic_write_text(tmp_path / "a.txt", "x"),
        atomic_write_bytes(tmp_path / "b.bin", b"x"),
        atomic_write_json(tmp_path / "c.json", {"x": 1}),
    ]
    with atomic_path(tmp_path / "d.tar") as tmp:
        tmp.write_bytes(b"x")
    written.append(tmp_path / "d.tar")
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_json_round_trip_is_stable(tmp_path):
    a = atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    b = atomic_write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert a.read_bytes() == b.read_bytes()
    assert read_json(a) == {"a": [1, 2], "b": 1}


def test_json_safe_writes_artifacts_strictly_and_summaries_printably():
    import dataclasses
    import json
    import math
    from pathlib import Path

    import numpy as np

    from roadwork_cli.io.atomic import json_safe

    @dataclasses.dataclass
    class Summary:
        folder: Path
        kinds: set
        scores: np.ndarray

    assert json_safe({"auroc": math.nan, "n": np.int64(3), "xs": (1.0, math.inf)}) == {
        "auroc": None,
        "n": 3,
        "xs": [1.0, None],
    }
    path = Path("runs/x")
    assert json_safe({"p": path})["p"] is path  # an artifact keeps what JSON cannot hold, so writing it fails loudly
    summary = Summary(path, {"b", "a"}, np.array([0.5, np.nan]))
    printed = json_safe({1: summary}, printable=True)
    assert printed == {"1": {"folder": "runs/x", "kinds": ["a", "b"], "scores": [0.5, None]}}
    json.dumps(printed, allow_nan=False)
