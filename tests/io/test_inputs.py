"""Expanding predict inputs (files, folders, globs, stdin) and the record formats."""

import csv
import io
import json

from roadwork_cli.io.inputs import FIELDS, STDIN_IMAGE, expand_inputs, records_to_text


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


def test_jsonl_and_csv_hold_every_contract_field():
    records = [
        {"path": "a.jpg", "p_roadwork": 0.9, "gate": 0.8, "decision": "roadwork", "error": None},
        {"path": "b,c.png", "p_roadwork": None, "gate": None, "decision": None, "error": "zero bytes"},
    ]
    lines = [json.loads(line) for line in records_to_text(records, "jsonl").splitlines()]
    assert lines == records
    rows = list(csv.DictReader(io.StringIO(records_to_text(records, "csv"))))
    assert tuple(rows[0]) == FIELDS
    assert rows[1]["path"] == "b,c.png" and rows[1]["error"] == "zero bytes" and rows[1]["p_roadwork"] == ""
