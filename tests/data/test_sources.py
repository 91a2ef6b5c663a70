"""Source readers: every kind is detected from its spec and yields labelled records (or rejections with reasons)."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roadwork_cli.config import DataSettings
from roadwork_cli.data.images import read_bytes
from roadwork_cli.data.sources import (
    SourceRecord,
    SourceRejection,
    create_source,
    detect_kind,
    list_sources,
    parse_label,
)
from roadwork_cli.errors import UsageError


def png(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def items(spec, settings=None, synthetic_dir=None):
    found = list(create_source(str(spec), settings, synthetic_dir))
    records = [i for i in found if isinstance(i, SourceRecord)]
    rejections = [i for i in found if isinstance(i, SourceRejection)]
    return records, rejections


def test_label_aliases():
    for value in ("roadwork", "ROADWORK", "1", 1, True, "positive", "pos", "Yes", "true"):
        assert parse_label(value) == 1, value
    for value in (
        "no_roadwork",
        "No-Roadwork",
        "noroadwork",
        "0",
        0,
        False,
        "negative",
        "neg",
        "none",
        "no",
        "background",
    ):
        assert parse_label(value) == 0, value
    for value in ("maybe", 2, None, "", 0.5):
        assert parse_label(value) is None, value
    assert {"folder", "csv", "jsonl", "parquet", "coco", "synthetic"} <= set(list_sources())


def test_class_folders_with_aliases_nesting_and_unknown_folders(tmp_path):
    for rel, seed in (
        ("Roadwork/a.png", 0),
        ("Roadwork/deep/er/b.png", 1),
        ("none/c.png", 2),
        ("neg/d.png", 3),
        ("cats/e.png", 4),
        ("loose.png", 5),
        (".hidden/f.png", 6),
    ):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(seed))
    assert detect_kind(str(tmp_path)) == "folder"
    records, rejections = items(tmp_path)
    labels = {r.locator.split(str(tmp_path) + "/")[1]: r.label for r in records}
    assert labels == {"Roadwork/a.png": 1, "Roadwork/deep/er/b.png": 1, "neg/d.png": 0, "none/c.png": 0}
    reasons = {r.locator.rsplit("/", 1)[1]: r.reason for r in rejections}
    assert reasons["e.png"] == "unknown class folder 'cats'"
    assert reasons["loose.png"] == "not inside a class folder"
    assert "f.png" not in reasons and all(r.source == str(tmp_path) for r in records)


def test_csv_and_jsonl_manifests_resolve_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,group\nimg/0.png,roadwork,g1\nimg/1.png,0,\nimg/2.png,maybe,g2\n")
    records, rejections = items(csv_path)
    assert [(r.locator, r.label, r.group) for r in records] == [
        (str(tmp_path / "img/0.png"), 1, "g1"),
        (str(tmp_path / "img/1.png"), 0, None),
    ]
    assert len(rejections) == 1 and "bad label 'maybe'" in rejections[0].reason
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        '{"path": "img/0.png", "label": 1}\nnot json\n{"path": "img/2.png", "label": "negative", "group": "clip"}\n'
    )
    records, rejections = items(jsonl)
    assert [(r.label, r.group) for r in records] == [(1, None), (0, "clip")]
    assert rejections[0].locator == f"{jsonl}:2" and rejections[0].reason.startswith("bad manifest line")
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,class\nx.png,1\n")
    with pytest.raises(UsageError, match="'path' and 'label'"):
        items(bad)


def test_parquet_bytes_and_struct_columns_and_folders(tmp_path):
    images = [png(i) for i in range(5)]
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(
        pa.table({"image": images[:3], "label": [1, 0, 1], "scene_description": ["a", "b", "c"]}),
        folder / "part-0.parquet",
        row_group_size=2,
    )
    pq.write_table(
        pa.table(
            {"image": [{"bytes": b, "path": None} for b in images[3:]], "label": ["0", "x"], "group": ["s1", "s2"]}
        ),
        folder / "part-1.parquet",
    )
    assert detect_kind(str(folder)) == "parquet"
    records, rejections = items(folder)
    assert [r.label for r in records] == [1, 0, 1, 0]
    assert records[3].group == "s1" and records[0].group is None
    assert [r.data for r in records] == images[:4]
    assert records[1].locator == f"{folder / 'part-0.parquet'}#row=1"
    assert read_bytes(records[3].locator) == images[3]  # the locator reads the same bytes back
    assert rejections[0].locator.endswith("part-1.parquet#row=1") and "bad label" in rejections[0].reason
    single, _ = items(folder / "part-0.parquet")
    assert len(single) == 3


def test_parquet_without_label_or_image_column_is_a_usage_error(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": [png(0)]}), path)
    with pytest.raises(UsageError, match="label"):
        items(path)
    pq.write_table(pa.table({"text": ["a"], "label": [1]}), path)
    with pytest.raises(UsageError, match="image"):
        items(path)
    pq.write_table(pa.table({"pixels": [png(0)], "label": [1]}), path)
    assert len(items(path, DataSettings(parquet_image_column="pixels"))[0]) == 1


def test_coco_image_level_labels(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "images" / name).write_bytes(png(ord(name[0])))
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7}, {"id": 2, "image_id": 2, "category_id": 8}],
        "categories": [{"id": 7, "name": "Cone"}, {"id": 8, "name": "car"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    assert detect_kind(str(path)) == "coco"
    records, _ = items(path)  # default roadwork list: a car box does not make an image roadwork
    assert {r.locator.rsplit("/", 1)[1]: r.label for r in records} == {"a.jpg": 1, "b.jpg": 0, "c.jpg": 0}
    assert records[0].locator == str(tmp_path / "images" / "a.jpg")  # found in the images/ subfolder
    records, _ = items(path, DataSettings(coco_positive_categories=["CAR"]))  # case-insensitive
    assert {r.locator.rsplit("/", 1)[1]: r.label for r in records} == {"a.jpg": 0, "b.jpg": 1, "c.jpg": 0}
    records, _ = items(path, DataSettings(coco_positive_categories=["*"]))  # any annotation
    assert {r.locator.rsplit("/", 1)[1]: r.label for r in records} == {"a.jpg": 1, "b.jpg": 1, "c.jpg": 0}


def write_coco(path: Path, categories: list[str], boxes: dict[str, str | None]) -> Path:
    """A COCO file with one image per ``boxes`` key, annotated with the category named by its value (or none)."""
    ids = {name: i + 1 for i, name in enumerate(categories)}
    images = [{"id": i + 1, "file_name": name} for i, name in enumerate(boxes)]
    annotations = [
        {"id": i + 1, "image_id": i + 1, "category_id": ids[category]}
        for i, category in enumerate(boxes.values())
        if category is not None
    ]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": v, "name": k} for k, v in ids.items()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def test_coco_roadwork_dataset_names_are_positive_by_default(tmp_path):
    names = ["Tubular_Marker", "vertical-panel", "Work Vehicle", "Temporary Traffic Control Sign", "Arrow Board"]
    boxes = {f"{i}.jpg": name for i, name in enumerate(names)} | {"car.jpg": "car", "empty.jpg": None}
    for i, name in enumerate(boxes):
        (tmp_path / name).write_bytes(png(i))
    records, _ = items(write_coco(tmp_path / "roadwork.json", [*names, "car"], boxes))
    labels = {r.locator.rsplit("/", 1)[1]: r.label for r in records}
    assert labels == {f"{i}.jpg": 1 for i in range(len(names))} | {"car.jpg": 0, "empty.jpg": 0}


def test_coco_category_that_matches_nothing_is_an_error_naming_the_available_ones(tmp_path):
    (tmp_path / "a.jpg").write_bytes(png(1))
    path = write_coco(tmp_path / "ann.json", ["cone", "car"], {"a.jpg": "cone"})
    with pytest.raises(UsageError) as info:
        items(path, DataSettings(coco_positive_categories=["cones"]))
    assert "['cones']" in str(info.value) and "Its categories are: car, cone" in str(info.value)
    # The default list with a file of unrelated categories would make every image negative: an error too.
    path = write_coco(tmp_path / "other.json", ["car", "person"], {"a.jpg": "car"})
    with pytest.raises(UsageError, match="none of its categories is in the default roadwork list.*car, person"):
        items(path)
    with pytest.raises(ValueError):
        DataSettings(coco_positive_categories=[])


def test_coco_standard_layout_and_image_dir(tmp_path):
    root = tmp_path / "coco"
    (root / "images" / "train2017").mkdir(parents=True)
    (root / "images" / "train2017" / "a.jpg").write_bytes(png(1))
    (root / "images" / "b.jpg").write_bytes(png(2))
    path = write_coco(root / "annotations" / "instances_train2017.json", ["cone"], {"a.jpg": "cone", "b.jpg": None})
    records, rejections = items(path)
    assert rejections == []
    assert {r.locator: r.label for r in records} == {
        str(root / "images" / "train2017" / "a.jpg"): 1,
        str(root / "images" / "b.jpg"): 0,
    }
    elsewhere = tmp_path / "pictures"
    elsewhere.mkdir()
    (elsewhere / "a.jpg").write_bytes(png(1))
    records, rejections = items(path, DataSettings(coco_image_dir=elsewhere))
    assert [r.locator for r in records] == [str(elsewhere / "a.jpg")]
    assert len(rejections) == 1 and "coco_image_dir" in rejections[0].reason  # b.jpg is not there


def test_kaggle_split_folders_are_read_and_the_source_split_kept(tmp_path):
    root = tmp_path / "kaggle"
    layout = {"train/roadwork/a.jpg": 1, "train/no_roadwork/b.jpg": 0, "valid/Roadwork/c.jpg": 1, "test/0/d.jpg": 0}
    for i, rel in enumerate(layout):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png(i))
    (root / "train" / "stray.jpg").write_bytes(png(9))
    assert detect_kind(str(root)) == "folder"
    records, rejections = items(root)
    assert {Path(r.locator).relative_to(root).as_posix(): r.label for r in records} == layout
    assert {Path(r.locator).relative_to(root).parts[0]: r.source for r in records} == {
        split: (root / split).as_posix() for split in ("train", "valid", "test")
    }
    assert all(r.group is None for r in records)  # a hint in source, not a group that would pin a whole split
    assert [Path(r.locator).name for r in rejections] == ["stray.jpg"]


def test_synthetic_spec_renders_half_per_class_and_reuses_files(tmp_path):
    settings = DataSettings(synthetic_size=(64, 48))
    records, _ = items("synthetic:6", settings, tmp_path / "syn")
    assert [r.label for r in records] == [0, 1, 0, 1, 0, 1]
    assert all(f"/{'roadwork' if r.label else 'no_roadwork'}/" in r.locator for r in records)
    first = Path(records[0].locator)
    inode = first.stat().st_ino  # an atomic re-write would replace the file, i.e. give a new inode
    again, _ = items("synthetic:6", settings, tmp_path / "syn")
    assert [r.locator for r in again] == [r.locator for r in records]
    assert first.stat().st_ino == inode
    with pytest.raises(UsageError, match="run directory"):
        items("synthetic:4")
    with pytest.raises(UsageError, match="synthetic:N"):
        items("synthetic:abc", settings, tmp_path)


def test_unknown_specs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        create_source(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="notes.txt"):
        create_source(str(tmp_path / "notes.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="empty"):
        create_source(str(empty))
