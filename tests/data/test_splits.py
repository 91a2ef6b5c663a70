"""Splits: deterministic, leakage-free, stable when images are added; duplicates and groups handled."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from split_helpers import write_splits

from roadwork_cli.config import DataSettings
from roadwork_cli.data.splits import (
    SPLIT_NAMES,
    Splits,
    SplitSummary,
    assign_split,
    build_splits,
    group_from_filename,
)
from roadwork_cli.errors import UsageError
from roadwork_cli.io.run import RunDir


def png(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def make_folder(root, positives, negatives, offset=0):
    for label, count in (("roadwork", positives), ("no_roadwork", negatives)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed = offset + i + (0 if label == "roadwork" else 100_000)
            (root / label / f"img{seed:06d}.png").write_bytes(png(seed))
    return root


def split_map(run: RunDir) -> dict[str, str]:
    splits = Splits.load(run.splits)
    return {sid: name for name in SPLIT_NAMES for sid in splits.ids(name)}


def test_same_sources_and_seed_give_byte_identical_files(tmp_path):
    data = make_folder(tmp_path / "data", 30, 30)
    first, second = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    summary = build_splits([str(data)], DataSettings(seed=3), first)
    build_splits([str(data)], DataSettings(seed=3), second)
    assert first.splits.read_bytes() == second.splits.read_bytes()
    assert summary.n_samples == 60 and summary.n_rejected == 0
    assert sum(summary.split_totals().values()) == 60
    raw = json.loads(first.splits.read_text())
    assert raw["version"] == 1 and raw["seed"] == 3 and set(raw["splits"]) == set(SPLIT_NAMES)
    sample = next(iter(raw["samples"].values()))
    # The contract's keys, plus the additive perceptual hash and near-duplicate cluster.
    assert set(sample) == {"path", "label", "source", "group", "phash", "near_duplicate"}
    assert sample["source"] == str(data) and len(sample["phash"]) == 16
    assert raw["near_duplicates"]["threshold_bits"] == DataSettings().near_duplicate_bits
    other = RunDir(tmp_path / "c")
    build_splits([str(data)], DataSettings(seed=4), other)
    assert split_map(other) != split_map(first)  # the seed matters


def test_adding_a_source_moves_no_earlier_image(tmp_path):
    data = make_folder(tmp_path / "data", 40, 40)
    more = make_folder(tmp_path / "more", 40, 40, offset=500)
    run = RunDir(tmp_path / "run")
    build_splits([str(data)], DataSettings(), run)
    before = split_map(run)
    build_splits([str(data), str(more)], DataSettings(), run)
    after = split_map(run)
    assert len(after) == 160
    assert all(after[sid] == name for sid, name in before.items())


def test_ids_are_sha256_of_bytes_and_exact_duplicates_fold(tmp_path):
    data = make_folder(tmp_path / "data", 5, 5)
    copy = tmp_path / "data" / "roadwork" / "zz_copy.png"
    copy.write_bytes((tmp_path / "data" / "roadwork" / "img000000.png").read_bytes())
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\ndata/roadwork/img000001.png,1\n")  # the same file again, via a manifest
    run = RunDir(tmp_path / "run")
    summary = build_splits([str(data), str(manifest)], DataSettings(), run)
    assert summary.n_samples == 10 and summary.n_duplicates == 2
    import hashlib

    splits = Splits.load(run.splits)
    digest = hashlib.sha256(png(0)).hexdigest()
    assert splits.samples[digest].path.endswith("roadwork/img000000.png")  # smallest locator wins
    assert sum(digest in splits.ids(name) for name in SPLIT_NAMES) == 1


def test_duplicates_with_conflicting_labels_are_all_rejected(tmp_path):
    data = make_folder(tmp_path / "data", 4, 4)
    clash = tmp_path / "data" / "no_roadwork" / "clash.png"
    clash.write_bytes((tmp_path / "data" / "roadwork" / "img000002.png").read_bytes())
    run = RunDir(tmp_path / "run")
    summary = build_splits([str(data)], DataSettings(), run)
    assert summary.n_samples == 7
    rejected = [json.loads(line) for line in run.rejected.read_text().splitlines()]
    assert {r["path"].rsplit("/", 1)[1] for r in rejected} == {"clash.png", "img000002.png"}
    assert all(r["reason"].startswith("duplicate bytes with conflicting labels (") for r in rejected)


def test_groups_stay_in_one_split(tmp_path):
    folder = tmp_path / "clips"
    rows = ["path,label,group"]
    for clip in range(12):
        for frame in range(4):
            name = f"clip{clip:02d}_{frame:04d}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(png(clip * 10 + frame))
            rows.append(f"clips/{name},{clip % 2},{'' if clip == 11 else f'scene{clip}'}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    for group_by, expected_groups in (("column", 11), ("filename", 12)):
        run = RunDir(tmp_path / group_by)
        build_splits([str(manifest)], DataSettings(group_by=group_by, fractions=(0.4, 0.2, 0.2, 0.2)), run)
        splits = Splits.load(run.splits)
        where: dict[str, set[str]] = {}
        for name in SPLIT_NAMES:
            for sid in splits.ids(name):
                group = splits.samples[sid].group
                if group is not None:
                    where.setdefault(group, set()).add(name)
        assert len(where) == expected_groups
        assert all(len(names) == 1 for names in where.values())
        assert len({next(iter(n)) for n in where.values()}) > 1  # groups do spread over splits
    run = RunDir(tmp_path / "none")
    build_splits([str(manifest)], DataSettings(group_by="none"), run)
    assert all(s.group is None for s in Splits.load(run.splits).samples.values())


def test_group_from_filename():
    assert group_from_filename("a/clip_0001.jpg") == "a/clip"
    assert group_from_filename("a/clip-12.png") == "a/clip"
    assert group_from_filename("a/cam01_frame0003.jpg") == "a/cam01"
    assert group_from_filename("a/clip/0001.jpg") == "a/clip"
    assert group_from_filename("x.parquet#row=3") is None


def test_assignment_follows_fractions_and_is_label_blind():
    fractions = (0.7, 0.1, 0.1, 0.1)
    names = [assign_split(f"id{i}", 0, fractions) for i in range(20000)]
    shares = [names.count(n) / len(names) for n in SPLIT_NAMES]
    assert np.allclose(shares, fractions, atol=0.015)
    assert assign_split("x", 0, (0.5, 0.0, 0.5, 0.0)) in ("train", "val_calib")


def test_no_usable_image_is_a_usage_error_but_rejections_are_written(tmp_path):
    data = tmp_path / "data" / "roadwork"
    data.mkdir(parents=True)
    (data / "empty.jpg").write_bytes(b"")
    run = RunDir(tmp_path / "run")
    with pytest.raises(UsageError, match="no usable image"):
        build_splits([str(tmp_path / "data")], DataSettings(), run)
    assert json.loads(run.rejected.read_text())["reason"] == "zero bytes"
    with pytest.raises(UsageError, match="no data source"):
        build_splits([], DataSettings(), run)


def test_splits_load_validates(tmp_path):
    path = tmp_path / "splits.json"
    with pytest.raises(UsageError, match="roadwork split"):
        Splits.load(path)
    write_splits(path, {"train": ["x"]}, {})
    with pytest.raises(UsageError, match="without a sample"):
        Splits.load(path)
    with pytest.raises(UsageError, match="unknown split"):
        Splits(0, {}, {}).ids("training")


def test_data_layer_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; import roadwork_cli.data.images, roadwork_cli.data.sources, roadwork_cli.data.splits, "
        "roadwork_cli.data.synthetic, roadwork_cli.cli.split; "
        "print(','.join(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def label_counts(run: RunDir) -> dict[str, tuple[int, int]]:
    """``{split: (negatives, positives)}`` from splits.json."""
    splits = Splits.load(run.splits)
    return {
        name: (
            sum(splits.samples[i].label == 0 for i in splits.ids(name)),
            sum(splits.samples[i].label == 1 for i in splits.ids(name)),
        )
        for name in SPLIT_NAMES
    }


def test_stratify_balances_each_label_exactly_and_deterministically(tmp_path):
    data = make_folder(tmp_path / "data", 23, 37)
    settings = DataSettings(stratify=True, seed=5)
    first, second = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    build_splits([str(data)], settings, first)
    build_splits([str(data)], settings, second)
    assert first.splits.read_bytes() == second.splits.read_bytes()
    # Largest-remainder counts of 37 and 23 over (0.7, 0.1, 0.1, 0.1): 26/4/4/3 (ties to earlier splits) and 16/3/2/2.
    expected_neg, expected_pos = (26, 4, 4, 3), (16, 3, 2, 2)
    assert label_counts(first) == {n: (expected_neg[i], expected_pos[i]) for i, n in enumerate(SPLIT_NAMES)}
    # Every seed gives the same counts, but other members.
    other = RunDir(tmp_path / "c")
    build_splits([str(data)], DataSettings(stratify=True, seed=6), other)
    assert label_counts(other) == label_counts(first) and split_map(other) != split_map(first)


def test_stratify_keeps_groups_whole(tmp_path):
    for clip in range(12):
        label = "roadwork" if clip % 2 else "no_roadwork"
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        for frame in range(3):
            (tmp_path / "data" / label / f"clip{clip:02d}_{frame:04d}.png").write_bytes(png(clip * 10 + frame))
    run = RunDir(tmp_path / "run")
    build_splits([str(tmp_path / "data")], DataSettings(stratify=True, group_by="filename"), run)
    splits = Splits.load(run.splits)
    by_group: dict[str, set[str]] = {}
    for name in SPLIT_NAMES:
        for sid in splits.ids(name):
            by_group.setdefault(splits.samples[sid].group, set()).add(name)
    assert len(by_group) == 12 and all(len(names) == 1 for names in by_group.values())
    # 6 clips of 3 per label: targets 12/2/2/2 (ends 12, 14, 16, 18); a clip goes where its first frame falls, so
    # clips starting at 0..9 fill train exactly, 12 goes to val_select and 15 to val_calib.
    assert label_counts(run) == {"train": (12, 12), "val_select": (3, 3), "val_calib": (3, 3), "test": (0, 0)}


def test_largest_remainder_counts():
    from roadwork_cli.data.splits import _largest_remainder

    assert _largest_remainder(10, (0.7, 0.1, 0.1, 0.1)) == [7, 1, 1, 1]
    assert _largest_remainder(5, (0.7, 0.1, 0.1, 0.1)) == [4, 1, 0, 0]
    assert _largest_remainder(3, (0.5, 0.0, 0.5, 0.0)) == [2, 0, 1, 0]
    assert sum(_largest_remainder(997, (0.6, 0.15, 0.15, 0.1))) == 997


def test_rerun_decodes_only_new_or_changed_inputs(tmp_path, monkeypatch):
    import roadwork_cli.data.splits as splits_module

    data = make_folder(tmp_path / "data", 6, 6)
    (data / "roadwork" / "broken.png").write_bytes(b"")
    run = RunDir(tmp_path / "run")
    build_splits([str(data)], DataSettings(), run)
    first = run.splits.read_bytes()

    decoded: list[int] = []
    real_decode = splits_module.decode_image
    monkeypatch.setattr(splits_module, "decode_image", lambda data, *a: decoded.append(1) or real_decode(data, *a))
    summary = build_splits([str(data)], DataSettings(), run)
    assert decoded == [] and run.splits.read_bytes() == first  # nothing decoded, same result
    assert summary.n_rejected == 1  # the cached rejection still counts

    changed = data / "roadwork" / "img000000.png"
    old_mtime = changed.stat().st_mtime_ns
    changed.write_bytes(png(999))
    os.utime(changed, ns=(old_mtime + 10**9, old_mtime + 10**9))  # a coarse clock could otherwise hide the edit
    build_splits([str(data)], DataSettings(), run)
    assert len(decoded) == 1
    # Other image limits invalidate every entry: a cached "ok" must not survive a stricter bomb limit.
    decoded.clear()
    build_splits([str(data)], DataSettings(max_image_pixels=100), run)
    assert len(decoded) == 13


def test_a_torn_cache_line_is_validated_again(tmp_path):
    data = make_folder(tmp_path / "data", 3, 3)
    run = RunDir(tmp_path / "run")
    build_splits([str(data)], DataSettings(), run)
    first = run.splits.read_bytes()
    lines = run.split_cache.read_text().splitlines(keepends=True)
    run.split_cache.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill mid-line
    build_splits([str(data)], DataSettings(), run)
    assert run.splits.read_bytes() == first
    assert len(run.split_cache.read_text().splitlines()) == 6


def test_all_rejected_error_summarises_the_reasons(tmp_path):
    data = tmp_path / "data"
    (data / "roadwork").mkdir(parents=True)
    (data / "train").mkdir()
    for i in range(3):
        (data / "roadwork" / f"e{i}.jpg").write_bytes(b"")
    (data / "roadwork" / "page.png").write_bytes(b"<html>Not Found</html>")
    (data / "train" / "x.jpg").write_bytes(png(1))
    with pytest.raises(UsageError) as info:
        build_splits([str(data)], DataSettings(), RunDir(tmp_path / "run"))
    message = str(info.value)
    assert "5 inputs, 5 rejected" in message
    assert "3 zero bytes" in message and "1 not an image" in message and "unknown class folder 'train'" in message


def test_warnings_for_one_class_and_small_splits(tmp_path):
    data = make_folder(tmp_path / "data", 0, 12)
    summary = build_splits([str(data)], DataSettings(), RunDir(tmp_path / "a"))
    (warning,) = summary.warnings(positives_needed=263)
    assert "one-class data set" in warning and "no_roadwork" in warning

    data = make_folder(tmp_path / "small", 30, 30)
    summary = build_splits([str(data)], DataSettings(stratify=True), RunDir(tmp_path / "b"))
    warnings = " ".join(summary.warnings(positives_needed=263))
    assert "val_select has 3 roadwork and 3 no_roadwork images" in warnings
    assert "val_calib has 3 roadwork images" in warnings and "at least 263" in warnings
    assert summary.warnings(positives_needed=3, min_per_class=3) == []


def test_an_interrupted_split_resumes_with_the_same_result(tmp_path, monkeypatch):
    import roadwork_cli.data.splits as splits_module

    data = make_folder(tmp_path / "data", 15, 15)
    clean = RunDir(tmp_path / "clean")
    build_splits([str(data)], DataSettings(), clean, workers=1)

    real_validate = splits_module._validate
    calls: list[int] = []

    def dies_on_the_20th(record, settings):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real_validate(record, settings)

    run = RunDir(tmp_path / "run")
    monkeypatch.setattr(splits_module, "_validate", dies_on_the_20th)
    with pytest.raises(KeyboardInterrupt):
        build_splits([str(data)], DataSettings(), run, workers=1)
    assert not run.splits.exists()

    calls.clear()
    monkeypatch.setattr(splits_module, "_validate", lambda r, s: calls.append(1) or real_validate(r, s))
    build_splits([str(data)], DataSettings(), run, workers=1)
    assert len(calls) == 11  # the 19 inputs validated before the interruption are not decoded again
    assert run.splits.read_bytes() == clean.splits.read_bytes()


@pytest.mark.parametrize(
    ("calib", "test", "expected"),
    [
        ((20, 20), (0, 12), ["test has 0 roadwork and 12 no_roadwork images: FNR on exits is not testable"]),
        ((20, 20), (12, 0), ["test has 12 roadwork and 0 no_roadwork images"]),
        ((20, 20), (0, 0), ["test has no images"]),
        ((0, 0), (12, 12), ["val_calib has no images"]),
        ((0, 20), (12, 12), ["val_calib has no roadwork image"]),
        ((20, 20), (12, 12), []),
    ],
)
def test_warnings_for_an_empty_or_one_class_test_or_val_calib(calib, test, expected):
    counts = {("train", 1, "s"): 50, ("train", 0, "s"): 50, ("val_select", 1, "s"): 20, ("val_select", 0, "s"): 20}
    for split, (pos, neg) in (("val_calib", calib), ("test", test)):
        counts.update({k: v for k, v in {(split, 1, "s"): pos, (split, 0, "s"): neg}.items() if v})
    warnings = SplitSummary(counts=counts).warnings()
    for text, start in zip(warnings, expected, strict=True):
        assert text.startswith(start), text
