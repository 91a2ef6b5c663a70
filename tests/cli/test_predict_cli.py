"""predict streams its records, keeps them on Ctrl-C, reads manifests and parquet, counts skipped files, and says
when a bundle's calibration is not certified or its gate has no effect."""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import subprocess
import sys
import threading

import pytest
from cli_helpers import export_tiny_bundle, jsonl_records, write_images
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.reporting.tables import NO_GUARANTEE
from roadwork_cli.stage1 import Prediction

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export_tiny_bundle(tmp_path_factory.mktemp("run"))


class FakeRule:
    """The parts of a SelectiveConformal that predict's output reads."""

    def __init__(self, rule: str = "gate", feasible: bool | None = True):
        self.rule = rule
        self.b = 0.7 if rule == "band" else None
        self.tau = 0.3
        self.params = {"targets": {"alpha": 0.02, "delta": 0.1, "xi": 0.8}}
        if feasible is not None:
            self.params["feasible"] = feasible


class FakeModel:
    """Yields one prediction per input; ``before_each(i)`` runs before input i is yielded, ``stop_at`` raises Ctrl-C."""

    def __init__(self, rule=None, before_each=None, stop_at: int | None = None):
        self.rule = rule or FakeRule()
        self.before_each = before_each
        self.stop_at = stop_at

    def iter_predict(self, images, batch_size=32, workers=0, progress=None, streams=None):
        for i, item in enumerate(images):
            if i == self.stop_at:
                raise KeyboardInterrupt
            if self.before_each is not None:
                self.before_each(i)
            yield Prediction(str(item), 0.25 + i / 1000, 0.75, "no_roadwork")


@pytest.fixture
def fake_model(monkeypatch):
    """Install a FakeModel as what load_bundle returns; the test configures it."""
    import roadwork_cli.stage1 as stage1

    model = FakeModel()
    monkeypatch.setattr(stage1, "load_bundle", lambda *args, **kwargs: model)
    return model


def test_records_reach_the_out_file_before_the_next_input_is_computed(fake_model, tmp_path):
    """Each record is flushed to OUT.partial before the model computes the next one; OUT appears complete at the end."""
    out = tmp_path / "preds.jsonl"
    partial = tmp_path / "preds.jsonl.partial"
    seen: list[int] = []

    def check(i: int) -> None:
        lines = partial.read_text().splitlines() if partial.exists() else []
        seen.append(len(lines))
        assert not out.exists()

    fake_model.before_each = check
    inputs = [f"img_{i}.jpg" for i in range(5)]
    result = runner.invoke(app, ["predict", *inputs, "--bundle", "b.tar", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen == [0, 1, 2, 3, 4]  # record i-1 was on disk when input i was computed
    assert [r["path"] for r in jsonl_records(out.read_text())] == inputs
    assert not partial.exists()


def test_ctrl_c_keeps_the_records_written_and_says_where(fake_model, tmp_path):
    fake_model.stop_at = 3
    out = tmp_path / "preds.csv"
    result = runner.invoke(
        app, ["predict", *[f"img_{i}.jpg" for i in range(6)], "--bundle", "b.tar", "--out", str(out)]
    )
    assert result.exit_code == 130
    kept = list(csv.DictReader(io.StringIO((tmp_path / "preds.csv.partial").read_text())))
    assert [r["path"] for r in kept] == ["img_0.jpg", "img_1.jpg", "img_2.jpg"]
    assert not out.exists()  # OUT only ever holds a complete result
    message = " ".join(result.output.split())
    assert "after 3 of 6 inputs" in message and "preds.csv.partial" in message
    assert "to resume" not in message


def test_ctrl_c_with_a_table_out_file_writes_the_partial_table_beside_it(fake_model, tmp_path):
    fake_model.stop_at = 1
    out = tmp_path / "preds.txt"
    result = runner.invoke(
        app, ["predict", "a.jpg", "b.jpg", "--bundle", "b.tar", "--format", "table", "--out", str(out)]
    )
    assert result.exit_code == 130 and not out.exists()
    table = (tmp_path / "preds.txt.partial").read_text()
    assert "a.jpg" in table and "b.jpg" not in table


def test_ctrl_c_on_stdout_keeps_the_lines_already_printed(fake_model):
    fake_model.stop_at = 2
    result = runner.invoke(app, ["predict", "a.jpg", "b.jpg", "c.jpg", "--bundle", "b.tar", "--format", "jsonl"])
    assert result.exit_code == 130
    assert [r["path"] for r in jsonl_records(result.stdout)] == ["a.jpg", "b.jpg"]
    assert "2 records kept in stdout" in " ".join(result.output.split())


@pytest.mark.parametrize(("feasible", "method"), [(False, "scrc"), (True, "scrc"), (None, "scrc"), (True, "crc")])
def test_summary_says_no_guarantee_only_when_not_certified(fake_model, feasible, method):
    fake_model.rule = FakeRule(feasible=feasible)
    fake_model.rule.params["method"] = method  # CRC bounds the FNR in expectation: feasible, yet not certified
    result = runner.invoke(app, ["predict", "a.jpg", "--bundle", "b.tar", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    certified = feasible is True and method == "scrc"
    assert (NO_GUARANTEE in output) == (feasible is not None and not certified)
    assert ("certified: FNR on exits <= 0.02" in output) == certified
    assert ("every image is deferred" in output) == (feasible is False)  # what an infeasible calibration decides
    assert NO_GUARANTEE not in result.stdout  # stdout stays machine-readable


def test_band_rule_table_hides_the_gate_and_says_why(fake_model):
    fake_model.rule = FakeRule(rule="band")
    result = runner.invoke(app, ["predict", "a.jpg", "--bundle", "b.tar", "--format", "table"])
    assert result.exit_code == 0, result.output
    table = " ".join(result.stdout.split())
    assert "band rule: decided on p alone" in table and "0.7" in table
    assert "0.7500" not in table  # the gate value of the fake predictions is not shown
    fake_model.rule = FakeRule(rule="gate")
    result = runner.invoke(app, ["predict", "a.jpg", "--bundle", "b.tar", "--format", "table"])
    assert "0.7500" in result.stdout and "band rule" not in result.stdout
    # The jsonl contract keeps the gate key whatever the rule.
    fake_model.rule = FakeRule(rule="band")
    result = runner.invoke(app, ["predict", "a.jpg", "--bundle", "b.tar", "--format", "jsonl"])
    assert jsonl_records(result.stdout)[0]["gate"] == 0.75
    assert "band rule: decided on p alone" in " ".join(result.output.split())  # said on stderr in every format


def test_probability_only_prints_p_alone_and_notes_on_stderr(fake_model):
    result = runner.invoke(app, ["predict", "a.jpg", "b.jpg", "--bundle", "b.tar", "--probability-only"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["0.250000", "0.251000"]
    note = " ".join(result.output.split())
    assert "--probability-only prints calibrated p(roadwork) for NATIX validators" in note and "can differ" in note


def test_skipped_non_image_files_are_counted_and_listed_with_debug(fake_model, tmp_path):
    folder = tmp_path / "mixed"
    write_images(folder, n=2)
    (folder / "notes.txt").write_text("x")
    (folder / "data.parquet").write_bytes(b"PAR1")
    result = runner.invoke(app, ["predict", str(folder), "--bundle", "b.tar", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    assert len(jsonl_records(result.stdout)) == 2
    assert "skipped non-image files: 2" in " ".join(result.output.split())
    result = runner.invoke(app, ["predict", str(folder), "--bundle", "b.tar", "--format", "jsonl", "--debug"])
    assert str(folder / "notes.txt") in result.output.replace("\n", "")


def test_manifests_and_parquet_are_inputs(bundle, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = write_images(tmp_path / "imgs", n=3)
    (tmp_path / "list.csv").write_text("path,label\nimgs/img_0.jpg,1\nimgs/img_2.jpg,0\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "imgs/img_1.jpg"}) + "\n")
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images], "label": [1, 0, 1]})
    pq.write_table(table, tmp_path / "set.parquet")
    inputs = [str(tmp_path / name) for name in ("list.csv", "list.jsonl", "set.parquet")]
    result = runner.invoke(app, ["predict", *inputs, "--bundle", str(bundle), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    records = jsonl_records(result.stdout)
    parquet = str(tmp_path / "set.parquet")
    assert [r["path"] for r in records] == [
        str(tmp_path / "imgs" / "img_0.jpg"),
        str(tmp_path / "imgs" / "img_2.jpg"),
        str(tmp_path / "imgs" / "img_1.jpg"),
        *(f"{parquet}#row={i}" for i in range(3)),
    ]
    assert all(r["error"] is None for r in records)
    by_path = {r["path"]: r["p_roadwork"] for r in records}
    # The same image scores the same from a manifest and from parquet bytes.
    assert by_path[f"{parquet}#row=1"] == pytest.approx(by_path[str(tmp_path / "imgs" / "img_1.jpg")], abs=1e-6)


def _start_predict(bundle, inputs: list, max_lines: int | None = None):
    """``roadwork predict INPUTS --format jsonl`` in a process, one image per batch; its stdout lines arrive on a queue.

    With ``max_lines`` the reader closes the pipe after that many lines, as ``| head -n max_lines`` would.
    """
    env = os.environ | {"HF_HUB_OFFLINE": "1", "ROADWORK_PREDICT__BATCH_SIZE": "1", "ROADWORK_PREDICT__WORKERS": "0"}
    command = [sys.executable, "-m", "roadwork_cli", "predict", *map(str, inputs), "--bundle", str(bundle)]
    proc = subprocess.Popen([*command, "--format", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        for count, line in enumerate(proc.stdout, start=1):
            if count == max_lines:
                proc.stdout.close()  # before the line is handed over: the test acts on a pipe already closed
                lines.put(line)
                return
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _feed(fifo, data: bytes) -> None:
    with open(fifo, "wb") as handle:  # opens once predict reads it
        handle.write(data)


def _stop(proc, fifo) -> None:
    if proc.poll() is None:
        proc.kill()
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # never leaves a writer blocked on the pipe


@pytest.mark.slow
def test_predict_streams_records_before_the_end_of_a_long_list(bundle, tmp_path):
    """A real process: the records of the first images arrive on stdout while a later input is still unavailable.

    The last input is a named pipe that the test fills only after reading the first records, so a predict that held
    its output until the end could never produce them (the read would time out): synchronised by data, not by time.
    """
    images = write_images(tmp_path / "imgs", n=4)
    late = tmp_path / "late.jpg"
    os.mkfifo(late)
    proc, lines = _start_predict(bundle, [*images, late])
    try:
        first = [json.loads(lines.get(timeout=120)) for _ in images]  # a time-out here means: no streaming
        assert [r["path"] for r in first] == [str(p) for p in images]
        assert proc.poll() is None  # still waiting for the last input
        _feed(late, images[0].read_bytes())
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
        last = json.loads(lines.get(timeout=10))
        assert last["path"] == str(late) and last["p_roadwork"] == first[0]["p_roadwork"]
    finally:
        _stop(proc, late)


@pytest.mark.slow
def test_a_closed_stdout_stops_predict_quietly(bundle, tmp_path):
    """``roadwork predict ... | head -1``: the next record meets a closed pipe; predict stops without a traceback."""
    images = write_images(tmp_path / "imgs", n=1)
    late = tmp_path / "late.jpg"
    os.mkfifo(late)
    proc, lines = _start_predict(bundle, [*images, late], max_lines=1)
    try:
        assert json.loads(lines.get(timeout=120))["path"] == str(images[0])
        _feed(late, images[0].read_bytes())  # only now is the second record computed, after the pipe was closed
        assert proc.wait(timeout=120) == 141
        stderr = proc.stderr.read().decode()
        assert "stdout was closed after 1 of 2 records" in stderr and "Traceback" not in stderr
    finally:
        _stop(proc, late)
