"""`roadwork split` end to end: broken files are listed with reasons, odd-but-valid ones kept, exit codes."""

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from roadwork_cli.cli.app import app

runner = CliRunner()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def rotated_jpeg() -> bytes:
    image = noise(9, (60, 20))
    exif = image.getexif()
    exif[0x0112] = 8  # displayed rotated by 90 degrees
    return encode(image, "JPEG", exif=exif.tobytes())


GOOD = {
    "roadwork/cmyk.jpg": lambda: encode(noise(1, mode="CMYK"), "JPEG"),
    "roadwork/gray.jpg": lambda: encode(noise(2, mode="L"), "JPEG"),
    "roadwork/rgba.png": lambda: encode(noise(3, mode="RGBA"), "PNG"),
    "roadwork/sub/palette.gif": lambda: encode(noise(4, mode="P"), "GIF"),
    "no_roadwork/sixteen.png": lambda: encode(
        Image.fromarray(np.random.default_rng(5).integers(0, 65535, (30, 40), dtype=np.uint16)), "PNG"
    ),
    "no_roadwork/photo.webp": lambda: encode(noise(6), "WEBP"),
    "no_roadwork/plain.bmp": lambda: encode(noise(7), "BMP"),
    "no_roadwork/rotated.jpg": rotated_jpeg,
}
BROKEN = {
    "roadwork/zero.jpg": (lambda: b"", "zero bytes"),
    "roadwork/truncated.jpg": (lambda: encode(noise(8, (64, 64)), "JPEG")[:700], "truncated image"),
    "roadwork/notes.jpg": (lambda: b"just some text, not a photo\n" * 3, "not an image (looks like HTML/text)"),
    "no_roadwork/page.png": (lambda: b"<html><body>Not Found</body></html>", "not an image (looks like HTML/text)"),
    "no_roadwork/bomb.png": (png_bomb, "too large"),
    "no_roadwork/random.webp": (lambda: np.random.default_rng(0).bytes(4096), "unreadable"),
}


def make_tree(root):
    for rel, make in GOOD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(make())
    for rel, (make, _) in BROKEN.items():
        (root / rel).write_bytes(make())
    return root


def split(*args):
    return runner.invoke(app, ["split", *args])


def test_broken_files_are_listed_and_valid_ones_kept(tmp_path):
    data = make_tree(tmp_path / "data")
    run = tmp_path / "run"
    result = split("--source", str(data), "--run", str(run), "--seed", "1", "--fractions", "0.5,0.2,0.2,0.1")
    assert result.exit_code == 0, result.output
    words = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "6 rejected" in words and "total" in words and "too large: 1" in words

    splits = json.loads((run / "splits.json").read_text())
    kept = {s["path"].split("/data/", 1)[1]: s["label"] for s in splits["samples"].values()}
    assert kept == {rel: int(rel.startswith("roadwork")) for rel in GOOD}
    assert splits["seed"] == 1
    rejected = {
        json.loads(line)["path"].split("/data/", 1)[1]: json.loads(line)["reason"]
        for line in (run / "rejected.jsonl").read_text().splitlines()
    }
    assert set(rejected) == set(BROKEN)
    for rel, (_, reason) in BROKEN.items():
        assert rejected[rel].startswith(reason), (rel, rejected[rel])

    from roadwork_cli.data.images import load_image

    rotated = next(s["path"] for s in splits["samples"].values() if s["path"].endswith("rotated.jpg"))
    assert load_image(rotated).size == (20, 60)
    assert (run / "config.yaml").exists()


def test_rerun_is_byte_identical_and_rejections_rewritten(tmp_path):
    data = make_tree(tmp_path / "data")
    run = tmp_path / "run"
    assert split("--source", str(data), "--run", str(run)).exit_code == 0
    first = (run / "splits.json").read_bytes(), (run / "rejected.jsonl").read_bytes()
    assert split("--source", str(data), "--run", str(run)).exit_code == 0
    assert ((run / "splits.json").read_bytes(), (run / "rejected.jsonl").read_bytes()) == first


def test_every_source_kind_together(tmp_path):
    images = [encode(noise(20 + i), "PNG") for i in range(8)]
    pq.write_table(pa.table({"image": images[:2], "label": [1, 0]}), tmp_path / "raw.parquet")
    pq.write_table(
        pa.table({"image": [{"bytes": b, "path": "x.png"} for b in images[2:4]], "label": [0, 1]}),
        tmp_path / "structs.parquet",
    )
    (tmp_path / "files").mkdir()
    for i in range(4, 8):
        (tmp_path / "files" / f"{i}.png").write_bytes(images[i])
    (tmp_path / "m.csv").write_text("path,label\nfiles/4.png,1\n")
    (tmp_path / "m.jsonl").write_text('{"path": "files/5.png", "label": "no_roadwork"}\n')
    coco = {
        "images": [{"id": 1, "file_name": "files/6.png"}, {"id": 2, "file_name": "files/7.png"}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1}],
        "categories": [{"id": 1, "name": "cone"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    sources = ["raw.parquet", "structs.parquet", "m.csv", "m.jsonl", "coco.json", "synthetic:4"]
    args = [arg for s in sources for arg in ("--source", str(tmp_path / s) if ":" not in s else s)]
    result = split(*args, "--run", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    samples = json.loads((tmp_path / "run" / "splits.json").read_text())["samples"].values()
    by_source = {}
    for s in samples:
        by_source.setdefault(s["source"].rsplit("/", 1)[-1], []).append(s["label"])
    assert {k: sorted(v) for k, v in by_source.items()} == {
        "raw.parquet": [0, 1],
        "structs.parquet": [0, 1],
        "m.csv": [1],
        "m.jsonl": [0],
        "coco.json": [0, 1],
        "synthetic:4": [0, 0, 1, 1],
    }


def test_exit_2_without_source_or_usable_image(tmp_path):
    result = split("--run", str(tmp_path / "run"))
    assert result.exit_code == 2 and "no data source" in result.output
    (tmp_path / "data" / "roadwork").mkdir(parents=True)
    (tmp_path / "data" / "roadwork" / "x.jpg").write_bytes(b"")
    result = split("--source", str(tmp_path / "data"), "--run", str(tmp_path / "run"))
    assert result.exit_code == 2 and "no usable image" in result.output
    result = split("--source", str(tmp_path / "nope"), "--run", str(tmp_path / "run"))
    assert result.exit_code == 2 and "nope" in result.output
    result = split("--source", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--fractions", "0.5,0.5")
    assert result.exit_code == 2 and "fractions" in result.output
    assert "Traceback" not in result.output


def kaggle_tree(root, per_class: int):
    """``root/{train,valid}/{roadwork,no_roadwork}/*.png`` with ``per_class`` distinct images per folder."""
    seed = 0
    for split_folder in ("train", "valid"):
        for label in ("roadwork", "no_roadwork"):
            (root / split_folder / label).mkdir(parents=True)
            for _ in range(per_class):
                seed += 1
                (root / split_folder / label / f"{seed}.png").write_bytes(encode(noise(seed, (12, 10)), "PNG"))
    return root


def test_kaggle_layout_through_the_cli_with_small_data_warnings(tmp_path):
    data = kaggle_tree(tmp_path / "kaggle", 8)
    run = tmp_path / "run"
    result = split("--source", str(data), "--run", str(run), "--stratify", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_samples"] == 32 and summary["n_rejected"] == 0
    assert {row["source"] for row in summary["rows"]} == {f"{data}/train", f"{data}/valid"}
    # 16 per label, stratified 11/2/2/1 (ties to earlier splits): far below what certification needs.
    warnings = " ".join(summary["warnings"])
    assert "val_calib has 2 roadwork images" in warnings
    assert "at least 263" in warnings  # the README's figure at the default alpha, delta and grid
    words = " ".join(result.output.split())
    assert "warning:" in words and "at least 263" in words


def test_one_class_data_set_is_a_warning(tmp_path):
    data = tmp_path / "data" / "no_roadwork"
    data.mkdir(parents=True)
    for seed in range(6):
        (data / f"{seed}.png").write_bytes(encode(noise(seed, (12, 10)), "PNG"))
    result = split("--source", str(tmp_path / "data"), "--run", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "one-class data set" in " ".join(result.output.split())


def test_a_one_value_environment_list_is_a_source(tmp_path, monkeypatch):
    data = kaggle_tree(tmp_path / "kaggle", 2)
    monkeypatch.setenv("ROADWORK_DATA__SOURCES", str(data))
    result = split("--run", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "run" / "splits.json").read_text())["samples"]) == 8


def test_a_mistyped_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADWORK_DATA__SEDE", "3")
    result = split("--source", "synthetic:2", "--run", str(tmp_path / "run"))
    words = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "did you mean 'data.seed'?" in words and "ROADWORK_DATA__SEDE" in words


def test_runtime_debug_from_the_environment_shows_the_traceback(tmp_path, monkeypatch):
    args = ("--source", str(tmp_path / "nope"), "--run", str(tmp_path / "run"))
    assert "Traceback" not in split(*args).output
    monkeypatch.setenv("ROADWORK_RUNTIME__DEBUG", "true")
    result = split(*args)
    assert result.exit_code == 2 and "Traceback" in result.output
