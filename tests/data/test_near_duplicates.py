"""Near-duplicates: found from a perceptual hash of real re-encodes, resizes and crops, never from unrelated images;
reported per split and across splits; grouped on request; the group column is named, and a missing one is an error."""

import io
import json
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roadwork_cli.config import DataSettings
from roadwork_cli.data import near_duplicates
from roadwork_cli.data import splits as splits_module
from roadwork_cli.data.near_duplicates import (
    close_pairs,
    find_clusters,
    fingerprint,
    hamming,
    hash_value,
    perceptual_hash,
    summarize,
    thumbnail_values,
)
from roadwork_cli.data.splits import SPLIT_NAMES, Splits, build_splits
from roadwork_cli.data.synthetic import render_scene, scene_seed
from roadwork_cli.errors import UsageError
from roadwork_cli.io.run import RunDir

THRESHOLD = DataSettings().near_duplicate_bits
MAX_DIFFERENCE = DataSettings().near_duplicate_max_difference


def near(a: Image.Image, b: Image.Image) -> bool:
    """The rule of ``split``: hashes within the threshold and thumbnails within the difference."""
    (hash_a, thumb_a), (hash_b, thumb_b) = fingerprint(a), fingerprint(b)
    difference = float(np.abs(thumbnail_values(thumb_a) - thumbnail_values(thumb_b)).mean())
    return hamming(hash_value(hash_a), hash_value(hash_b)) <= THRESHOLD and difference <= MAX_DIFFERENCE


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def natural_noise(seed: int, size=(240, 320)) -> Image.Image:
    """A natural-looking random image: colour noise with a 1/f amplitude spectrum, as natural photos have."""
    rng = np.random.default_rng(seed)
    freq = np.sqrt(np.fft.fftfreq(size[0])[:, None] ** 2 + np.fft.fftfreq(size[1])[None, :] ** 2)
    freq[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=size) + 1j * rng.normal(size=size)) / freq
        plane = np.real(np.fft.ifft2(spectrum))
        channels.append((plane - plane.min()) / (plane.max() - plane.min()) * 255)
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def crop(image: Image.Image, fraction: float, corner: int | None = None) -> Image.Image:
    """Remove ``fraction`` of the width and of the height: centred, or anchored at one of four corners (the whole
    cut on two sides, the hardest case for a hash of the whole image)."""
    w, h = image.size
    dx, dy = round(w * fraction), round(h * fraction)
    ox, oy = (dx // 2, dy // 2) if corner is None else ((0, dx)[corner % 2], (0, dy)[corner // 2])
    return image.crop((ox, oy, w - dx + ox, h - dy + oy))


def variants(image: Image.Image) -> dict[str, bytes]:
    """One image as users meet it again, as real encoded files: re-encoded at quality 95 and 60, resized to half,
    and a centred crop removing 5 % of its area (2.5 % of the width and of the height)."""
    w, h = image.size
    return {
        "q95": jpeg(image, 95),
        "q60": jpeg(image, 60),
        "half": jpeg(image.resize((w // 2, h // 2), Image.Resampling.BILINEAR), 90),
        "crop": jpeg(crop(image, 0.025), 90),
    }


def write_variants(folder, images: dict[str, Image.Image], label_of=lambda i: i % 2) -> dict[str, list[str]]:
    """Variants of each image as files ``<class>/<name>_<variant>.jpg``; returns name -> the variants' file names."""
    files: dict[str, list[str]] = {}
    for index, (name, image) in enumerate(images.items()):
        target = folder / ("roadwork" if label_of(index) else "no_roadwork")
        target.mkdir(parents=True, exist_ok=True)
        for kind, data in variants(image).items():
            (target / f"{name}_{kind}.jpg").write_bytes(data)
            files.setdefault(name, []).append(f"{name}_{kind}.jpg")
    return files


def cluster_by_file(run: RunDir) -> dict[str, str | None]:
    splits = Splits.load(run.splits)
    return {s.path.rsplit("/", 1)[1]: s.near_duplicate for s in splits.samples.values()}


def test_reencodes_resizes_and_crops_of_one_image_form_one_cluster(tmp_path):
    scenes = {f"scene{i}": render_scene(scene_seed(5, i), i % 2) for i in range(6)}
    scenes |= {f"noise{i}": natural_noise(i) for i in range(3)}
    files = write_variants(tmp_path / "data", scenes)
    run = RunDir(tmp_path / "run")
    summary = build_splits([str(tmp_path / "data")], DataSettings(), run)
    cluster = cluster_by_file(run)
    for name, names in files.items():
        ids = {cluster[f] for f in names}
        assert len(ids) == 1 and None not in ids, f"{name}: variants split over clusters {ids}"
    assert len(set(cluster.values())) == len(files)  # and no two images merged
    report = summary.near_duplicates
    assert report["clusters"] == len(files) and report["images"] == 4 * len(files) and report["largest"] == 4
    assert report["threshold_bits"] == THRESHOLD


def test_unrelated_images_are_not_grouped(tmp_path):
    folder = tmp_path / "data"
    for i in range(40):
        target = folder / ("roadwork" if i % 2 else "no_roadwork")
        target.mkdir(parents=True, exist_ok=True)
        (target / f"scene{i}.jpg").write_bytes(jpeg(render_scene(scene_seed(9, i), i % 2), 90))
        (target / f"noise{i}.jpg").write_bytes(jpeg(natural_noise(100 + i), 90))
    run = RunDir(tmp_path / "run")
    summary = build_splits([str(folder)], DataSettings(), run)
    assert summary.n_samples == 80
    assert summary.near_duplicates["clusters"] == 0 and summary.near_duplicates["images"] == 0
    assert all(v is None for v in cluster_by_file(run).values())


def test_group_by_near_duplicates_keeps_each_cluster_in_one_split(tmp_path):
    scenes = {f"scene{i}": render_scene(scene_seed(3, i), i % 2) for i in range(24)}
    write_variants(tmp_path / "data", scenes)
    fractions = (0.25, 0.25, 0.25, 0.25)
    loose = RunDir(tmp_path / "none")
    summary = build_splits([str(tmp_path / "data")], DataSettings(group_by="none", fractions=fractions), loose)
    # Without grouping, 4 images per cluster over 4 equal splits: a cluster stays whole with probability 1/64.
    report = summary.near_duplicates
    assert report["clusters"] == 24 and report["across_splits"] >= 12
    loose_splits = Splits.load(loose.splits)
    for name in SPLIT_NAMES:  # only the part of a cluster inside one split counts there
        inside = loose_splits.near_duplicate_clusters(name)
        assert len(inside) == report["per_split"][name]["clusters"]
        assert all(loose_splits.split_of(sid) == name for ids in inside.values() for sid in ids)
    assert sum(report["split_pairs"].values()) >= report["across_splits"]
    (warning,) = summary.near_duplicate_warnings()
    assert f"{report['across_splits']} near-duplicate clusters" in warning and "leakage" in warning
    assert warning in summary.warnings()

    for group_by in ("near_duplicates", "auto"):
        run = RunDir(tmp_path / group_by)
        summary = build_splits([str(tmp_path / "data")], DataSettings(group_by=group_by, fractions=fractions), run)
        splits = Splits.load(run.splits)
        where: dict[str, set[str]] = {}
        for name in SPLIT_NAMES:
            for sid in splits.ids(name):
                sample = splits.samples[sid]
                assert sample.group == f"near_duplicate:{sample.near_duplicate}"
                where.setdefault(sample.near_duplicate, set()).add(name)
        assert len(where) == 24 and all(len(names) == 1 for names in where.values())
        assert len({next(iter(names)) for names in where.values()}) > 1  # clusters still spread over the splits
        assert summary.near_duplicates["across_splits"] == 0 and summary.near_duplicate_warnings() == []
        assert splits.near_duplicates == summary.near_duplicates  # the same report in splits.json
        for name in SPLIT_NAMES:
            inside = splits.near_duplicate_clusters(name)
            assert len(inside) == summary.near_duplicates["per_split"][name]["clusters"]
            assert sum(map(len, inside.values())) == summary.near_duplicates["per_split"][name]["images"]
        per_split = summary.near_duplicates["per_split"]
        totals = summary.split_totals()
        assert all(per_split[name]["images"] == totals[name] for name in SPLIT_NAMES)  # every image is in a cluster


def test_auto_puts_column_groups_first(tmp_path):
    image = render_scene(scene_seed(1, 0), 1)
    folder = tmp_path / "img"
    folder.mkdir()
    rows = ["path,label,clip_id"]
    for kind, data in variants(image).items():
        (folder / f"{kind}.jpg").write_bytes(data)
    rows += ["img/q95.jpg,1,clipA", "img/q60.jpg,1,", "img/half.jpg,1,", "img/crop.jpg,1,clipB"]
    other = render_scene(scene_seed(1, 1), 0)
    for kind, data in variants(other).items():
        (folder / f"other_{kind}.jpg").write_bytes(data)
        rows.append(f"img/other_{kind}.jpg,0,")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    run = RunDir(tmp_path / "run")
    build_splits([str(manifest)], DataSettings(group_column="clip_id"), run)
    group = {s.path.rsplit("/", 1)[1]: s.group for s in Splits.load(run.splits).samples.values()}
    # Column groups stay; the ungrouped near-duplicates join the smallest column group of their cluster ...
    assert group["q95.jpg"] == "clipA" and group["crop.jpg"] == "clipB"
    assert group["q60.jpg"] == group["half.jpg"] == "clipA"
    # ... and a cluster without any column group is its own group.
    others = {group[f"other_{kind}.jpg"] for kind in ("q95", "q60", "half", "crop")}
    assert len(others) == 1 and next(iter(others)).startswith("near_duplicate:")


def test_named_group_column_is_used_and_a_missing_one_is_an_error(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    rows = ["path,label,clip_id"]
    for clip in range(10):
        for frame in range(4):
            # Each clip's frames are different noise images: only the column can group them.
            array = np.random.default_rng(clip * 100 + frame).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, "PNG")
            (folder / f"c{clip}f{frame}.png").write_bytes(buffer.getvalue())
            rows.append(f"clips/c{clip}f{frame}.png,{clip % 2},clip{clip}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    fractions = (0.4, 0.2, 0.2, 0.2)

    run = RunDir(tmp_path / "named")
    build_splits([str(manifest)], DataSettings(group_by="column", group_column="clip_id", fractions=fractions), run)
    splits = Splits.load(run.splits)
    where: dict[str, set[str]] = {}
    for name in SPLIT_NAMES:
        for sid in splits.ids(name):
            where.setdefault(splits.samples[sid].group, set()).add(name)
    assert set(where) == {f"clip{c}" for c in range(10)} and all(len(n) == 1 for n in where.values())
    # clip_id is one of the known group columns, so it is also found without being named.
    auto = RunDir(tmp_path / "found")
    build_splits([str(manifest)], DataSettings(group_by="column", fractions=fractions), auto)
    assert {s.group for s in Splits.load(auto.splits).samples.values()} == set(where)

    with pytest.raises(UsageError, match="'sequence' .*not found in manifest"):
        build_splits([str(manifest)], DataSettings(group_by="column", group_column="sequence"), RunDir(tmp_path / "x"))
    with pytest.raises(UsageError, match="'sequence' .*not found"):
        build_splits([str(manifest)], DataSettings(group_column="sequence"), RunDir(tmp_path / "y"))
    bare = tmp_path / "bare.csv"
    bare.write_text("path,label,take\n" + "".join(f"clips/c{c}f0.png,{c % 2},t{c}\n" for c in range(10)))
    with pytest.raises(UsageError, match="group_by is 'column' but manifest .* has no group column"):
        build_splits([str(bare)], DataSettings(group_by="column"), RunDir(tmp_path / "z"))

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"path": f"clips/c{c}f0.png", "label": c % 2}) + "\n" for c in range(4)))
    with pytest.raises(UsageError, match="'clip_id' .*not found in manifest"):
        build_splits([str(jsonl)], DataSettings(group_column="clip_id"), RunDir(tmp_path / "j"))

    table = pa.table(
        {
            "image": [(folder / f"c{c}f{f}.png").read_bytes() for c in range(10) for f in range(4)],
            "label": [c % 2 for c in range(10) for _ in range(4)],
            "Sequence": [f"s{c}" for c in range(10) for _ in range(4)],
        }
    )
    parquet = tmp_path / "d.parquet"
    pq.write_table(table, parquet)
    with pytest.raises(UsageError, match="'clip_id' .*not found in parquet file"):
        build_splits([str(parquet)], DataSettings(group_column="clip_id"), RunDir(tmp_path / "p"))
    run = RunDir(tmp_path / "pq")
    build_splits([str(parquet)], DataSettings(group_by="column", group_column="sequence", fractions=fractions), run)
    assert {s.group for s in Splits.load(run.splits).samples.values()} == {f"s{c}" for c in range(10)}


def test_hashes_are_cached_and_old_cache_entries_are_hashed_again(tmp_path, monkeypatch):
    scenes = {f"scene{i}": render_scene(scene_seed(2, i), i % 2) for i in range(3)}
    write_variants(tmp_path / "data", scenes)
    run = RunDir(tmp_path / "run")
    first = build_splits([str(tmp_path / "data")], DataSettings(), run)
    calls = []

    def counting(image):
        calls.append(1)
        return fingerprint(image)

    monkeypatch.setattr(splits_module, "fingerprint", counting)
    build_splits([str(tmp_path / "data")], DataSettings(), run)
    assert calls == []  # nothing decoded or hashed again
    assert Splits.load(run.splits).near_duplicates == first.near_duplicates
    # A cache written before fingerprints were recorded: its usable entries are validated (and hashed) once more.
    lines = [json.loads(line) for line in run.split_cache.read_text().splitlines()]
    old = {"phash", "thumb"}
    run.split_cache.write_text("".join(json.dumps({k: v for k, v in e.items() if k not in old}) + "\n" for e in lines))
    build_splits([str(tmp_path / "data")], DataSettings(), run)
    assert len(calls) == 12
    assert all(old <= set(json.loads(line)) for line in run.split_cache.read_text().splitlines())


@pytest.mark.parametrize("block_elements", [1 << 22, 1])  # one block per bucket, or one row per block
def test_multi_index_search_finds_exactly_the_brute_force_pairs(monkeypatch, block_elements):
    monkeypatch.setattr(near_duplicates, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300, dtype=np.uint64)
    near = []
    for value in base[:150]:  # planted neighbours at 0..10 flipped bits, across every chunk boundary
        flips = rng.choice(64, size=int(rng.integers(0, 11)), replace=False)
        near.append(int(value) ^ sum(1 << int(b) for b in flips))
    values = np.unique(np.concatenate([base, np.array(near, dtype=np.uint64)]))
    for threshold in (0, 1, 4, 6, 9):
        found = {tuple(sorted(p)) for p in close_pairs(values, threshold)}
        brute = {
            (i, j)
            for i, j in combinations(range(len(values)), 2)
            if hamming(int(values[i]), int(values[j])) <= threshold
        }
        assert found == brute, threshold
        assert threshold == 0 or len(brute) > 0


def test_popcount_without_numpy_2_and_library_defaults_match_the_settings():
    values = np.random.default_rng(1).integers(0, 2**64, size=(7, 5), dtype=np.uint64)
    expected = np.array([[bin(int(v)).count("1") for v in row] for row in values])
    assert np.array_equal(near_duplicates._popcount_by_table(values), expected)
    assert np.array_equal(near_duplicates._popcount(values), expected)
    assert near_duplicates.DEFAULT_THRESHOLD_BITS == THRESHOLD
    assert near_duplicates.DEFAULT_MAX_DIFFERENCE == MAX_DIFFERENCE


def test_clusters_are_components_and_ids_do_not_depend_on_order():
    # a-b and b-c are within 2 bits, a-c are 4 apart: a chain is one cluster; d is far from all.
    hashes = {"b": 0b0011, "a": 0b0000, "c": 0b1111, "d": 0xFFFF_FFFF_0000_0000, "e": 0xFFFF_FFFF_0000_0000}
    clusters = find_clusters(hashes, 2)
    assert clusters == {"a": "a", "b": "a", "c": "a", "d": "d", "e": "d"}
    assert find_clusters(dict(reversed(list(hashes.items()))), 2) == clusters
    assert find_clusters(hashes, 0) == {"d": "d", "e": "d"}  # identical hashes only


def test_report_counts_clusters_per_split_and_per_split_pair():
    clusters = {"a1": "a1", "a2": "a1", "a3": "a1", "b1": "b1", "b2": "b1", "c1": "c1", "c2": "c1", "c3": "c1"}
    split_of = {
        "a1": "train", "a2": "train", "a3": "test",  # 2 in train (within), and train/test leakage
        "b1": "val_calib", "b2": "val_calib",  # within val_calib only
        "c1": "train", "c2": "val_select", "c3": "val_calib",  # three splits, no two in one
        "x": "train",
    }  # fmt: skip
    labels = {"a1": 1, "a2": 1, "a3": 1, "b1": 0, "b2": 1, "c1": 0, "c2": 0, "c3": 0, "x": 1}
    assert "mixed_labels" not in summarize(clusters, split_of, SPLIT_NAMES, 6, 7.5)
    report = summarize(clusters, split_of, SPLIT_NAMES, 6, 7.5, labels)
    assert report == {
        "threshold_bits": 6,
        "max_difference": 7.5,
        "clusters": 3,
        "images": 8,
        "largest": 3,
        "per_split": {
            "train": {"clusters": 1, "images": 2},
            "val_select": {"clusters": 0, "images": 0},
            "val_calib": {"clusters": 1, "images": 2},
            "test": {"clusters": 0, "images": 0},
        },
        "across_splits": 2,
        "split_pairs": {"train/val_select": 1, "train/val_calib": 1, "train/test": 1, "val_select/val_calib": 1},
        "mixed_labels": 1,  # b: one roadwork, one not
    }


def test_thumbnails_keep_look_alike_hashes_apart(tmp_path):
    """Uniform black, grey and white frames have (almost) the same perceptual hash; thumbnails tell them apart."""
    folder = tmp_path / "data" / "no_roadwork"
    folder.mkdir(parents=True)
    for name, colour in (("black", (0, 0, 0)), ("white", (255, 255, 255)), ("grey", (128, 128, 128))):
        image = Image.new("RGB", (64, 48), colour)
        (folder / f"{name}.png").write_bytes(jpeg(image, 95))
        (folder / f"{name}_again.jpg").write_bytes(jpeg(image.resize((32, 24)), 60))
    black, white = (hash_value(fingerprint(Image.new("RGB", (8, 8), c))[0]) for c in ((0, 0, 0), (255, 255, 255)))
    assert hamming(black, white) <= 1  # all-zero DCT vs DC only: one bit apart
    run = RunDir(tmp_path / "run")
    build_splits([str(tmp_path / "data")], DataSettings(), run)
    cluster = cluster_by_file(run)
    for name in ("black", "white", "grey"):
        assert cluster[f"{name}.png"] == cluster[f"{name}_again.jpg"] is not None
    assert len(set(cluster.values())) == 3
    # With the thumbnail check off (255), the hash alone decides and the three colours become one cluster.
    loose = RunDir(tmp_path / "loose")
    build_splits([str(tmp_path / "data")], DataSettings(near_duplicate_max_difference=255), loose)
    assert len(set(cluster_by_file(loose).values())) == 1


def test_a_cluster_labelled_both_ways_is_warned_about(tmp_path):
    files = variants(render_scene(scene_seed(6, 0), 1))
    for kind, data in files.items():
        folder = tmp_path / "data" / ("roadwork" if kind in ("q95", "half") else "no_roadwork")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{kind}.jpg").write_bytes(data)
    summary = build_splits([str(tmp_path / "data")], DataSettings(), RunDir(tmp_path / "run"))
    assert summary.near_duplicates["clusters"] == 1 and summary.near_duplicates["mixed_labels"] == 1
    assert any("1 near-duplicate clusters hold both roadwork and no_roadwork" in w for w in summary.warnings())


def test_hash_is_imagehash_phash_as_hex():
    image = render_scene(scene_seed(0, 0), 0)
    text = perceptual_hash(image)
    assert len(text) == 16 and int(text, 16) == hash_value(text)
    assert hamming(hash_value(text), hash_value(perceptual_hash(image.resize((160, 120))))) <= 4


@pytest.mark.slow
def test_measured_false_merge_and_hit_rates_on_300_scenes():
    """The figures behind the defaults (README): 300 scenes of different seeds, their re-encodes, resizes and crops.
    Bounds are set with slack under the measured rates, so a worse hash, threshold or check fails."""
    n = 300
    scenes = [render_scene(scene_seed(21, i), i % 2) for i in range(n)]
    prints = [fingerprint(s) for s in scenes]
    base = np.array([hash_value(h) for h, _ in prints], dtype=np.uint64)
    thumbs = np.stack([thumbnail_values(t) for _, t in prints])
    upper = np.triu_indices(n, 1)
    close = np.bitwise_count(base[:, None] ^ base[None, :])[upper] <= THRESHOLD
    alike = np.abs(thumbs[:, None, :] - thumbs[None, :, :]).mean(-1)[upper] <= MAX_DIFFERENCE
    # The hash alone merges some unrelated scenes (they share one street layout); the thumbnails must undo that.
    assert close.sum() >= 1
    assert (close & alike).sum() <= 1  # measured 0 here and 0 of 1.1 M pairs over 1,500 scenes
    hits = {"q95": 0, "q60": 0, "half": 0, "crop": 0, "corner2": 0, "corner3": 0, "corner5": 0}
    for i, scene in enumerate(scenes):
        for kind, data in variants(scene).items():
            hits[kind] += near(scene, Image.open(io.BytesIO(data)))
        for kind, fraction in (("corner2", 0.02), ("corner3", 0.03), ("corner5", 0.05)):
            hits[kind] += near(scene, crop(scene, fraction, i % 4))
    rates = {kind: count / n for kind, count in hits.items()}
    print(f"hash-close pairs {close.sum()}, merged {(close & alike).sum()} of {close.size}; hit rates {rates}")
    assert rates["q95"] == rates["q60"] == rates["half"] == rates["crop"] == 1.0
    assert rates["corner2"] >= 0.93  # corner-anchored, 2 % of each side (~4 % of the area); measured 0.98
    assert rates["corner3"] >= 0.8  # measured 0.87
    # Corner crops of 5 % of each side (~10 % of the area) often escape a whole-image hash (measured 0.38): a stated
    # limit of the method, checked so that the README's figure stays true.
    assert 0.2 <= rates["corner5"] <= 0.55


@pytest.mark.slow
def test_measured_rates_on_natural_looking_random_images():
    """The README's second column: 1/f colour noise, which has the spectrum of natural photos but no shared layout."""
    n = 100
    images = [natural_noise(1000 + i) for i in range(n)]
    prints = {str(i): fingerprint(image) for i, image in enumerate(images)}
    hashes = {key: hash_value(h) for key, (h, _) in prints.items()}
    assert find_clusters(hashes, THRESHOLD, {key: t for key, (_, t) in prints.items()}, MAX_DIFFERENCE) == {}
    hits = {"variants": 0, "corner2": 0, "corner3": 0, "corner5": 0}
    for i, image in enumerate(images):
        hits["variants"] += all(near(image, Image.open(io.BytesIO(data))) for data in variants(image).values())
        for kind, fraction in (("corner2", 0.02), ("corner3", 0.03), ("corner5", 0.05)):
            hits[kind] += near(image, crop(image, fraction, i % 4))
    rates = {kind: count / n for kind, count in hits.items()}
    print(f"natural-looking noise: hit rates {rates}")
    assert rates["variants"] == 1.0  # q95, q60, 0.5x and the centred 5 %-of-area crop, all found
    assert rates["corner2"] >= 0.9  # measured 0.94 (0.97 on another 150)
    assert rates["corner3"] >= 0.7  # measured 0.78 (0.83)
    assert 0.1 <= rates["corner5"] <= 0.5  # measured 0.29 (0.27)


def test_split_command_reports_near_duplicates_and_warns_of_leakage(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from roadwork_cli.cli.app import app

    write_variants(tmp_path / "data", {f"scene{i}": render_scene(scene_seed(4, i), i % 2) for i in range(8)})
    monkeypatch.setenv("ROADWORK_DATA__GROUP_BY", "none")
    args = ["split", "--source", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--seed", "2"]
    result = CliRunner().invoke(app, [*args, "--fractions", "0.25,0.25,0.25,0.25", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["near_duplicates"]
    assert report == json.loads((tmp_path / "run" / "splits.json").read_text())["near_duplicates"]
    assert report["clusters"] == 8 and report["images"] == 32 and report["across_splits"] > 0
    words = " ".join(result.output.split())
    assert f"hash within {THRESHOLD} bits, thumbnails within {MAX_DIFFERENCE:g} levels): 8 clusters, 32 images" in words
    assert f"across splits: {report['across_splits']}; not grouped (group_by none)" in words
    assert "leakage that inflates validation and test metrics" in words
