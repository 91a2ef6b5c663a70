"""Issue 17 item 12: a bundle holds no machine path, and its splits.json still says where each image was.

One run is split from every source kind (class folders, a CSV and a JSONL manifest whose images lie beside the
manifest's folder, a parquet file, a COCO file in ``annotations/`` with its images in ``images/``, ``synthetic:N``),
given as relative specs, as a user types them. It is then trained in each of the three modes and exported after each.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.data.images import read_bytes
from roadwork_cli.export import portable_splits
from roadwork_cli.io.bundle import read_bundle
from roadwork_cli.io.run import RunDir

runner = CliRunner()


def _jpeg(path: Path, seed: int) -> bytes:
    """A distinct small JPEG (noise seeded by ``seed``) at ``path``; its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path.read_bytes()


def _sources(data: Path) -> dict[str, str]:
    """Every source kind under ``data``; spec (relative to ``data``) -> the folder its paths are relative to."""
    seed = iter(range(1000))
    for label in ("roadwork", "no_roadwork"):
        for i in range(3):
            _jpeg(data / "photos" / label / f"{label}_{i}.jpg", next(seed))
    for i in range(4):
        _jpeg(data / "lists" / "images" / f"m{i}.jpg", next(seed))
    (data / "lists" / "manifests").mkdir(parents=True)
    (data / "lists" / "manifests" / "a.csv").write_text(
        "path,label\n" + "".join(f"../images/m{i}.jpg,{i % 2}\n" for i in range(2))
    )
    (data / "lists" / "manifests" / "b.jsonl").write_text(
        "".join(json.dumps({"path": f"../images/m{i}.jpg", "label": i % 2}) + "\n" for i in range(2, 4))
    )
    rows = [_jpeg(data / "tmp.jpg", next(seed)) for _ in range(4)]
    (data / "tmp.jpg").unlink()
    pq.write_table(pa.table({"image": rows, "label": [1, 0, 1, 0]}), data / "street.parquet")
    names = [f"c{i}.jpg" for i in range(4)]
    for name in names:
        _jpeg(data / "coco" / "images" / name, next(seed))
    coco = {
        "images": [{"id": i + 1, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 3, "category_id": 1}],
        "categories": [{"id": 1, "name": "cone"}],
    }
    (data / "coco" / "annotations").mkdir(parents=True)
    (data / "coco" / "annotations" / "roadwork.json").write_text(json.dumps(coco))
    return {
        "photos": "photos",
        "lists/manifests/a.csv": "lists/manifests",
        "lists/manifests/b.jsonl": "lists/manifests",
        "street.parquet": ".",
        "coco/annotations/roadwork.json": "coco/annotations",
        "synthetic:6": "",  # rendered into the run: relative to the run
    }


def _machine_strings(root: Path) -> list[bytes]:
    """Byte forms of ``root`` a member could leak (as given and with links resolved)."""
    return sorted({str(root).encode(), str(root.resolve()).encode()})


def _check_bundle(bundle: Path, run: RunDir, data: Path, bases: dict[str, str]) -> None:
    contents = read_bundle(bundle)
    for name, data_bytes in contents.members.items():
        for machine in _machine_strings(data.parent):
            assert machine not in data_bytes, f"{name} holds the machine path {machine!r}"
    original = json.loads(run.splits.read_text())
    exported = json.loads(contents.members["splits.json"])
    assert exported["splits"] == original["splits"]
    by_name = {Path(spec).name: base for spec, base in bases.items()}
    for image_id, sample in exported["samples"].items():
        path = sample["path"]
        assert isinstance(path, str) and path and not path.startswith("/"), sample
        # Meaningful: the recorded path, read from its source's folder (or the run's), gives the image of this id.
        base = run.root if sample["source"].startswith("synthetic:") else data / by_name[sample["source"]]
        file, hash_mark, row = path.partition("#")
        locator = str(base / file) + hash_mark + row
        assert hashlib.sha256(read_bytes(locator)).hexdigest() == image_id, sample


@pytest.mark.slow
def test_bundles_of_every_train_mode_and_source_kind_hold_no_machine_path(tmp_path, monkeypatch):
    data = tmp_path / "work"
    bases = _sources(data)
    monkeypatch.chdir(data)  # relative specs, as typed in a shell
    config = tmp_path / "settings.yaml"
    config.write_text(
        "model: {backbone: tiny_vit}\nfeatures: {workers: 0}\ntrain: {epochs: 1}\n"
        "data: {fractions: [0.4, 0.2, 0.2, 0.2]}\nruntime: {device: cpu, threads: 1}\n"
    )
    run = RunDir(data / "runs" / "r1")
    split = ["split", "--run", "runs/r1", "--config", str(config)]
    for spec in bases:
        split += ["--source", spec]
    result = runner.invoke(app, split)
    assert result.exit_code == 0, result.output
    recorded = json.loads(run.splits.read_text())["samples"]
    assert len(recorded) == 6 + 4 + 4 + 4 + 6  # every image of every source, none rejected
    assert runner.invoke(app, ["cache-features", "--run", "runs/r1", "--config", str(config)]).exit_code == 0

    for mode, env in (("train_cached", {}), ("train", {"ROADWORK_MODEL__PEFT__METHOD": "lora"}), ("train_crc", {})):
        result = runner.invoke(app, ["train", "--run", "runs/r1", "--mode", mode, "--config", str(config)], env=env)
        assert result.exit_code == 0, result.output
        calibrate = ["calibrate", "--run", "runs/r1", "--allow-infeasible", "--config", str(config)]
        assert runner.invoke(app, calibrate, env=env).exit_code == 0
        bundle = tmp_path / f"{mode}.tar"
        export = ["export", "--run", "runs/r1", "--out", str(bundle), "--allow-uncertified", "--config", str(config)]
        result = runner.invoke(app, export, env=env)
        assert result.exit_code == 0, result.output
        _check_bundle(bundle, run, data, bases)
        # The live loop's merged adapters travel as backbone weights: that member is scanned too.
        assert ("backbone.safetensors" in read_bundle(bundle).members) == (mode == "train")


def test_portable_paths_of_a_linked_run_and_file_name_groups(tmp_path):
    real = tmp_path / "disk"
    (real / "run" / "synthetic").mkdir(parents=True)
    os.symlink(real, tmp_path / "home")  # the run was split through a link, export reads it through another form
    run_root = tmp_path / "home" / "run"
    images = tmp_path / "data" / "images"
    manifest = str(tmp_path / "data" / "lists" / "m.csv")
    samples = {
        "a" * 64: {"path": str(real / "run" / "synthetic" / "x.jpg"), "label": 1, "source": "synthetic:4",
                   "group": str(real / "run" / "synthetic" / "x")},
        "b" * 64: {"path": str(images / "clip_0001.jpg"), "label": 1, "source": manifest,
                   "group": str(images / "clip")},
        "c" * 64: {"path": "/far/away/clip_0002.jpg", "label": 1, "source": manifest,
                   "group": "/far/away/clip"},
        "d" * 64: {"path": str(images / "z.jpg"), "label": 0, "source": "photos", "group": "column-value"},
    }  # fmt: skip
    exported = portable_splits({"version": 1, "seed": 0, "splits": {}, "samples": samples}, run_root)["samples"]
    assert str(tmp_path) not in json.dumps(exported)
    assert exported["a" * 64]["path"] == "synthetic/x.jpg" and exported["a" * 64]["group"] == "synthetic/x"
    assert exported["b" * 64]["path"] == "../images/clip_0001.jpg" and exported["b" * 64]["group"] == "../images/clip"
    # Too far from its source to be meaningful: the path is dropped, the group kept as a hash (members share it).
    assert exported["c" * 64]["path"] is None and exported["c" * 64]["group"].startswith("sha256:")
    assert (
        exported["c" * 64]["group"]
        == portable_splits({"samples": {"x": samples["c" * 64]}}, run_root)["samples"]["x"]["group"]
    )
    # A relative source (a splits.json written before sources were recorded absolutely) gives no base: dropped.
    assert exported["d" * 64]["path"] is None and exported["d" * 64]["group"] == "column-value"
