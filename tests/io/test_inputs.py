"""Expanding predict inputs (files, folders, globs, manifests, parquet, stdin), the record formats and the streaming
writer."""

import csv
import io
import json
import os
import stat

import pytest

from roadwork_cli.io.inputs import FIELDS, STDIN_IMAGE, RecordWriter, expand_inputs


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folders_recurse_sorted_skip_hidden_and_non_images(tmp_path):
    _touch(tmp_path / "d" / "b.JPG")
    _touch(tmp_path / "d" / "sub" / "a.png")
    _touch(tmp_path / "d" / "notes.txt")
    _touch(tmp_path / "d" / ".hidden" / "c.jpg")
    shown = [entry[0] for entry in expand_inputs([str(tmp_path / "d")])]
    assert shown == [str(tmp_path / "d" / "b.JPG"), str(tmp_path / "d" / "sub" / "a.png")]


def test_empty_folder_and_unmatched_glob_become_error_entries_missing_files_pass_through(tmp_path):
    (tmp_path / "empty").mkdir()
    entries = expand_inputs([str(tmp_path / "empty"), str(tmp_path / "*.webp"), str(tmp_path / "missing.jpg")])
    assert [(item is None, error is not None) for _, item, error in entries] == [
        (True, True),
        (True, True),
        (False, False),
    ]


def test_globs_expand_in_order(tmp_path):
    for name in ("2.jpg", "1.jpg", "3.png"):
        _touch(tmp_path / name)
    assert [e[0] for e in expand_inputs([str(tmp_path / "*.jpg")])] == [
        str(tmp_path / "1.jpg"),
        str(tmp_path / "2.jpg"),
    ]


def test_stdin_holds_paths_or_one_encoded_image(tmp_path):
    paths = io.BytesIO(f"{tmp_path / 'a.jpg'}\n\n{tmp_path / 'b.jpg'}\n".encode())
    assert [e[0] for e in expand_inputs(["-"], stdin=paths)] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    jpeg = b"\xff\xd8\xff\xe0" + b"\x00" * 16
    [(shown, item, error)] = expand_inputs(["-"], stdin=io.BytesIO(jpeg))
    assert shown == STDIN_IMAGE and item == jpeg and error is None


def _streamed(records: list[dict], fmt: str) -> str:
    """What a RecordWriter writes to a stream for ``records``."""
    stream = io.StringIO()
    writer = RecordWriter(fmt, stream=stream)
    for record in records:
        writer.write(record)
    writer.finish()
    return stream.getvalue()


def test_jsonl_and_csv_hold_every_contract_field():
    records = [
        {"path": "a.jpg", "p_roadwork": 0.9, "gate": 0.8, "decision": "roadwork", "error": None},
        {"path": "b,c.png", "p_roadwork": None, "gate": None, "decision": None, "error": "zero bytes"},
    ]
    lines = [json.loads(line) for line in _streamed(records, "jsonl").splitlines()]
    assert lines == records
    rows = list(csv.DictReader(io.StringIO(_streamed(records, "csv"))))
    assert tuple(rows[0]) == FIELDS
    assert rows[1]["path"] == "b,c.png" and rows[1]["error"] == "zero bytes" and rows[1]["p_roadwork"] == ""


def test_skipped_non_image_files_are_reported_to_the_caller(tmp_path):
    _touch(tmp_path / "d" / "a.jpg")
    _touch(tmp_path / "d" / "notes.txt")
    _touch(tmp_path / "d" / "sub" / "set.parquet")
    _touch(tmp_path / "d" / ".DS_Store")
    skipped: list[str] = []
    assert [e[0] for e in expand_inputs([str(tmp_path / "d")], skipped=skipped)] == [str(tmp_path / "d" / "a.jpg")]
    assert skipped == [str(tmp_path / "d" / "notes.txt"), str(tmp_path / "d" / "sub" / "set.parquet")]


def test_manifests_expand_to_their_paths_relative_to_the_manifest(tmp_path):
    _touch(tmp_path / "m" / "list.csv").write_text("label,file\n1,a.jpg\n0,\n1,/abs/b.png\n")
    lines = [json.dumps({"path": "c.jpg", "label": 1}), "not json", json.dumps({"image": "sub/d.jpg"})]
    _touch(tmp_path / "m" / "list.jsonl").write_text("\n".join(lines) + "\n\n")
    _touch(tmp_path / "m" / "nopath.csv").write_text("label\n1\n")
    entries = expand_inputs([str(tmp_path / "m" / n) for n in ("list.csv", "list.jsonl", "nopath.csv")])
    base = tmp_path / "m"
    assert [(shown, error) for shown, _, error in entries] == [
        (str(base / "a.jpg"), None),
        (f"{base / 'list.csv'}:3", "manifest row without a path"),
        ("/abs/b.png", None),
        (str(base / "c.jpg"), None),
        (f"{base / 'list.jsonl'}:2", "bad manifest line: not a JSON object"),
        (str(base / "sub" / "d.jpg"), None),
        (str(base / "nopath.csv"), "manifest has no path column (path, file, filename, image)"),
    ]


def test_parquet_expands_to_row_locators_and_a_bad_file_is_one_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"a", b"b"], "label": [0, 1]}), tmp_path / "set.parquet")
    _touch(tmp_path / "bad.parquet", b"not parquet")
    entries = expand_inputs([str(tmp_path / "set.parquet"), str(tmp_path / "bad.parquet")])
    located = f"{tmp_path / 'set.parquet'}"
    assert [(shown, item) for shown, item, _ in entries[:2]] == [(f"{located}#row={i}",) * 2 for i in range(2)]
    assert entries[2][0] == str(tmp_path / "bad.parquet") and "unreadable parquet file" in entries[2][2]


RECORDS = [
    {"path": "a.jpg", "p_roadwork": 0.9, "gate": 0.8, "decision": "roadwork", "error": None},
    {"path": "b.jpg", "p_roadwork": None, "gate": None, "decision": None, "error": "zero bytes"},
]


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("jsonl", '{"path": "a.jpg", "p_roadwork": 0.9, "gate": 0.8, "decision": "roadwork", "error": null}\n'),
        ("csv", "path,p_roadwork,gate,decision,error\na.jpg,0.9,0.8,roadwork,\n"),
        ("probability", "0.900000\n"),
    ],
)
def test_writer_streams_each_record_as_it_comes(fmt, expected):
    stream = io.StringIO()
    writer = RecordWriter(fmt, stream=stream)
    writer.write(RECORDS[0])
    assert stream.getvalue() == expected  # on the stream before the next record exists
    writer.write(RECORDS[1])
    writer.finish()
    assert stream.getvalue() == _streamed(RECORDS, fmt) and stream.getvalue().startswith(expected)
    assert writer.written == 2


def test_writer_file_is_partial_until_finished_and_follows_the_umask(tmp_path):
    out = tmp_path / "sub" / "preds.jsonl"
    writer = RecordWriter("jsonl", out)
    writer.write(RECORDS[0])
    assert not out.exists()
    assert writer.partial_path.read_text() == _streamed(RECORDS[:1], "jsonl")  # flushed, not buffered
    writer.write(RECORDS[1])
    writer.finish()
    assert out.read_text() == _streamed(RECORDS, "jsonl") and not writer.partial_path.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_writer_abort_keeps_the_partial_file(tmp_path):
    writer = RecordWriter("csv", tmp_path / "preds.csv")
    writer.write(RECORDS[0])
    assert writer.abort() == str(tmp_path / "preds.csv.partial")
    assert list(csv.DictReader(io.StringIO((tmp_path / "preds.csv.partial").read_text())))[0]["path"] == "a.jpg"
    assert not (tmp_path / "preds.csv").exists()
    with pytest.raises(ValueError, match="unknown format"):
        RecordWriter("xml", tmp_path / "x.xml")
    assert not (tmp_path / "x.xml.partial").exists()  # nothing is created for a bad format
