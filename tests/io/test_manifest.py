"""Manifest rows: one reader (io/manifest.py) behind ``split``'s CSV/JSONL sources and ``predict``'s inputs."""

from __future__ import annotations

import json

import pytest

from roadwork_cli.data.sources import SourceRecord, SourceRejection, create_source
from roadwork_cli.io.inputs import expand_inputs
from roadwork_cli.io.manifest import ManifestColumnsError, read_manifest


def test_rows_normalise_columns_locate_paths_and_name_bad_lines(tmp_path):
    csv_path = tmp_path / "m" / "list.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(" Label ,FILE,Group\n1,a.jpg, g1 \n0,,\n1,/abs/b.png,\n")
    rows = list(read_manifest(csv_path, "list.csv"))
    assert [(r.where, r.path, r.text("group")) for r in rows] == [
        ("list.csv:2", str(csv_path.parent / "a.jpg"), "g1"),
        ("list.csv:3", None, None),
        ("list.csv:4", "/abs/b.png", None),
    ]
    assert rows[0].columns["label"] == "1"
    jsonl = tmp_path / "m" / "list.jsonl"
    jsonl.write_text(json.dumps({"image": "c.jpg", "path": ""}) + "\n\n[1]\nnot json\n")
    rows = list(read_manifest(jsonl))
    assert [(r.where, r.path, r.error) for r in rows] == [
        (f"{jsonl}:1", str(jsonl.parent / "c.jpg"), None),  # the first non-empty path column wins
        (f"{jsonl}:3", None, "bad manifest line: not a JSON object"),
        (f"{jsonl}:4", None, "bad manifest line: not a JSON object"),
    ]
    bare = tmp_path / "bare.csv"
    bare.write_text("path\nx.jpg\n")
    with pytest.raises(ManifestColumnsError, match="label"):
        list(read_manifest(bare, required=("label",)))
    assert [r.path for r in read_manifest(bare)] == [str(tmp_path / "x.jpg")]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_split_and_predict_read_the_same_rows(tmp_path, suffix):
    manifest = tmp_path / f"list{suffix}"
    rows = [("a.jpg", "1"), ("", "0"), ("/abs/b.png", "roadwork"), ("sub/c.jpg", "0")]
    if suffix == ".csv":
        manifest.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    else:
        manifest.write_text("".join(json.dumps({"path": p, "label": y}) + "\n" for p, y in rows) + "not json\n")
    found = list(create_source(str(manifest)))
    entries = expand_inputs([str(manifest)])
    assert [i.locator for i in found if isinstance(i, SourceRecord)] == [e[0] for e in entries if e[2] is None]
    rejected = [(i.locator, i.reason) for i in found if isinstance(i, SourceRejection)]
    assert rejected == [(e[0], e[2]) for e in entries if e[2] is not None]
    assert len(rejected) == (1 if suffix == ".csv" else 2)
