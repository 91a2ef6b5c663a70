"""Stale-artifact detection: a stage whose inputs changed since it ran refuses with the command to run."""

from __future__ import annotations

import json

import pytest

from roadwork_cli.errors import UsageError
from roadwork_cli.io.provenance import StaleError, check, fingerprint, record
from roadwork_cli.io.run import RunDir


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "run").ensure()
    run.splits.write_text('{"splits": 1}')
    (run.features).mkdir()
    (run.features / "current.json").write_text('{"fingerprint": "abc"}')
    return run


def test_unchanged_inputs_pass(run):
    record(run, "train", [run.splits, run.features / "current.json"])
    check(run, "train", command="train")
    assert set(json.loads(run.provenance.read_text())["stages"]["train"]) == {
        "splits.json",
        "features/current.json",
    }


def test_changed_input_refuses_with_the_command(run):
    record(run, "cache-features", [run.splits])
    run.splits.write_text('{"splits": 2}')
    with pytest.raises(StaleError) as info:
        check(run, "cache-features", command="cache-features")
    message = str(info.value)
    assert "splits.json changed after `roadwork cache-features` ran" in message
    assert f"roadwork cache-features --run {run.root}" in message
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_vanished_input_refuses(run):
    record(run, "train", [run.splits, run.features / "current.json"])
    (run.features / "current.json").unlink()
    with pytest.raises(StaleError, match="features/current.json was removed"):
        check(run, "train", command="train")


def test_no_record_is_a_no_op(run):
    check(run, "calibrate", command="calibrate")  # an old run without provenance.json
    record(run, "train", [run.splits])
    check(run, "calibrate", command="calibrate")  # another stage's record does not count


def test_records_of_stages_are_kept_apart_and_rerecording_updates(run):
    record(run, "cache-features", [run.splits])
    record(run, "train", [run.splits])
    run.splits.write_text('{"splits": 3}')
    record(run, "cache-features", [run.splits])  # cache-features re-run on the new split
    check(run, "cache-features", command="cache-features")
    with pytest.raises(StaleError):
        check(run, "train", command="train")  # train still describes the old split


def test_fingerprint_is_sixteen_hex_of_sha256(tmp_path):
    import hashlib

    path = tmp_path / "x.bin"
    path.write_bytes(b"roadwork")
    assert fingerprint(path) == hashlib.sha256(b"roadwork").hexdigest()[:16]


def test_moved_run_keeps_its_provenance(run, tmp_path):
    import shutil

    record(run, "train", [run.splits])
    moved = RunDir(tmp_path / "moved")
    shutil.copytree(run.root, moved.root)
    check(moved, "train", command="train")
    moved.splits.write_text("{}")
    with pytest.raises(StaleError):
        check(moved, "train", command="train")
