"""Feature cache: contents, resume after a crash, zero-forward re-runs, fingerprint folders, bad images."""

from __future__ import annotations

import pytest
import torch
from cache_helpers import make_run, tiny_settings
from PIL import Image
from safetensors.torch import load_file

from roadwork_cli.data.transforms import eval_transform
from roadwork_cli.errors import UsageError
from roadwork_cli.features.cache import cache_features, load_cached, read_split_table
from roadwork_cli.io.atomic import read_json
from roadwork_cli.model.backbones import create_backbone


class Crash(Exception):
    pass


def _counting(backbone):
    calls = []
    backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return backbone, calls


def test_cache_holds_clean_features_of_every_image_and_views_of_train(tiny_run):
    settings = tiny_settings(tiny_run, views=2)
    summary = cache_features(tiny_run, settings)
    table = read_split_table(tiny_run)
    n_images, n_train = len(table.paths), len(table.ids("train"))
    assert summary.total == summary.computed == n_images + 2 * n_train
    assert summary.failed == 0 and summary.reused == 0
    cached = load_cached(tiny_run)
    assert cached.fingerprint == summary.fingerprint and cached.feature_dim == 32
    assert cached.features.shape == (summary.total, 32)
    for image_id in table.ids("train"):
        assert set(cached.rows[image_id]) == {0, 1, 2}
    for image_id in table.ids("test"):
        assert set(cached.rows[image_id]) == {0}
    meta = read_json(summary.folder / "meta.json")
    assert meta["backbone"]["name"] == "tiny_vit" and meta["fingerprint"] == summary.fingerprint
    assert meta["feature_dim"] == 32 and meta["preprocessing"]["size"] == 64
    # Shards hold float16 and respect shard_size.
    shards = sorted(summary.folder.glob("shard_*.safetensors"))
    assert all(load_file(str(p))["features"].dtype == torch.float16 for p in shards)
    assert max(load_file(str(p))["features"].shape[0] for p in shards) <= settings.features.shard_size

    # Row of view 0 == the backbone on the clean eval transform (up to float16 storage).
    backbone = create_backbone("tiny_vit")
    image_id = table.ids("val_select")[0]
    x = eval_transform(backbone.preprocessing)(Image.open(table.paths[image_id]).convert("RGB"))[None]
    with torch.inference_mode():
        expected = backbone(x)[0]
    torch.testing.assert_close(cached.features[cached.rows[image_id][0]], expected, atol=2e-3, rtol=2e-3)
    # Augmented views differ from the clean view.
    train_id = table.ids("train")[0]
    assert not torch.allclose(cached.features[cached.rows[train_id][0]], cached.features[cached.rows[train_id][1]])


def test_rerun_with_everything_cached_does_no_forward_pass(tiny_run):
    settings = tiny_settings(tiny_run, views=1)
    first = cache_features(tiny_run, settings)
    backbone, calls = _counting(create_backbone("tiny_vit"))
    again = cache_features(tiny_run, settings, backbone=backbone)
    assert calls == [] and again.forward_passes == 0 and again.computed == 0
    assert again.reused == first.total and again.fingerprint == first.fingerprint
    # Asking for more views computes only the new ones.
    more = cache_features(tiny_run, tiny_settings(tiny_run, views=2), backbone=backbone)
    assert more.computed == len(read_split_table(tiny_run).ids("train")) == sum(calls)


def test_crash_after_a_shard_resumes_to_identical_features(tmp_path):
    clean_run = make_run(tmp_path / "clean")
    crash_run = make_run(tmp_path / "crash")
    settings = tiny_settings(clean_run, views=1)
    clean = cache_features(clean_run, settings)

    def crash(shard):
        raise Crash(shard)

    with pytest.raises(Crash):
        cache_features(crash_run, tiny_settings(crash_run, views=1), on_shard=crash)
    folder = crash_run.features / clean.fingerprint
    assert len(read_json(folder / "index.json")["shards"]) == 1  # exactly the first shard survived
    backbone, calls = _counting(create_backbone("tiny_vit"))
    resumed = cache_features(crash_run, tiny_settings(crash_run, views=1), backbone=backbone)
    shard_size = settings.features.shard_size
    assert resumed.reused == shard_size and resumed.computed == clean.total - shard_size == sum(calls)

    a, b = load_cached(clean_run), load_cached(crash_run)
    assert a.rows == b.rows
    assert torch.equal(a.features, b.features)


def test_different_backbone_or_preprocessing_gets_its_own_folder(tiny_run):
    vit = cache_features(tiny_run, tiny_settings(tiny_run))
    settings = tiny_settings(tiny_run)
    settings.model.backbone = "tiny_dinov3"
    dino = cache_features(tiny_run, settings)
    settings.model.backbone, settings.model.image_size = "tiny_vit", 32
    small = cache_features(tiny_run, settings)
    assert len({vit.fingerprint, dino.fingerprint, small.fingerprint}) == 3
    assert dino.reused == 0 and small.reused == 0  # nothing stale was reused
    assert load_cached(tiny_run).fingerprint == small.fingerprint  # current.json follows the last run
    assert load_cached(tiny_run, vit.fingerprint).meta["backbone"]["name"] == "tiny_vit"
    with pytest.raises(UsageError, match="cache-features"):
        load_cached(tiny_run, "0" * 16)


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    run = make_run(tmp_path, bad=2)
    summary = cache_features(run, tiny_settings(run, views=1))
    failed = read_json(summary.folder / "failed.json")
    assert summary.failed == len(failed) == 2
    assert all(reason for reason in failed.values())
    cached = load_cached(run)
    assert not set(failed) & set(cached.rows)
    assert set(cached.failed) == set(failed)
    # A re-run neither crashes nor retries them.
    assert cache_features(run, tiny_settings(run, views=1)).computed == 0


def test_missing_splits_is_a_usage_error(tmp_path):
    from roadwork_cli.io.run import RunDir

    run = RunDir(tmp_path / "empty").ensure()
    with pytest.raises(UsageError, match="roadwork split"):
        cache_features(run, tiny_settings(run))


@pytest.mark.parametrize("streams", [2, 3])
def test_cpu_streams_write_the_one_stream_cache_byte_for_byte(tmp_path, streams):
    """S streams of one thread each: the same shards, index and failures as one stream, augmented views included."""
    runs = {s: make_run(tmp_path / str(s), bad=2) for s in (1, streams)}
    for s, run in runs.items():
        settings = tiny_settings(run, views=2, streams=s)
        settings.runtime.threads = 1
        cache_features(run, settings)
    folders = {s: next(run.features.glob("*/index.json")).parent for s, run in runs.items()}
    names = sorted(p.name for p in folders[1].iterdir())
    assert names == sorted(p.name for p in folders[streams].iterdir())
    assert any(name.endswith(".safetensors") for name in names) and "failed.json" in names
    for name in names:
        assert (folders[1] / name).read_bytes() == (folders[streams] / name).read_bytes(), name
    assert len(read_json(folders[streams] / "failed.json")) == 2  # one bad file, one failure


def test_streams_setting_is_auto_or_a_positive_count(tiny_run):
    assert tiny_settings(tiny_run).features.streams == "auto"
    assert tiny_settings(tiny_run, streams=4).features.streams == 4
    with pytest.raises(UsageError, match="streams"):
        tiny_settings(tiny_run, streams=0)


def test_reduced_precision_features_get_their_own_folder_and_stay_close(tiny_run):
    fp32 = cache_features(tiny_run, tiny_settings(tiny_run))
    settings = tiny_settings(tiny_run)
    settings.runtime.precision = "bf16"
    bf16 = cache_features(tiny_run, settings)
    assert bf16.fingerprint == f"{fp32.fingerprint}-bf16" and bf16.reused == 0
    assert load_cached(tiny_run, bf16.fingerprint).meta["compute_precision"] == "bf16"
    a = load_cached(tiny_run, fp32.fingerprint).features
    b = load_cached(tiny_run, bf16.fingerprint).features
    assert not torch.equal(a, b)  # bf16 really ran
    assert torch.allclose(a, b, atol=0.1 * a.abs().max().item())


def test_cache_records_its_recipe_and_its_inputs_for_stale_run_detection(tiny_run):
    from roadwork_cli.io.provenance import StaleError, check

    summary = cache_features(tiny_run, tiny_settings(tiny_run))
    recipe = read_json(summary.folder / "meta.json")["recipe"]
    assert recipe["decode"] == {"jpeg_draft": True, "draft_side": 64} and recipe["compute_precision"] == "fp32"
    assert recipe["preprocessing"]["size"] == 64
    check(tiny_run, "cache-features", "cache-features")  # nothing changed yet
    tiny_run.splits.write_text(tiny_run.splits.read_text() + "\n")  # a re-split, as far as the bytes go
    with pytest.raises(StaleError, match="cache-features"):
        check(tiny_run, "cache-features", "cache-features")


def test_another_augmentation_recomputes_the_augmented_views_only(tiny_run):
    from roadwork_cli.config import load_settings
    from roadwork_cli.data.transforms import augmentation_from_settings
    from roadwork_cli.io.atomic import atomic_write_json

    def settings_with(augment):
        base = tiny_settings(tiny_run, views=1).model_dump(mode="json")
        return load_settings(None, base | {"data": base["data"] | {"augment": augment}}, environ={})

    n_train = len(read_split_table(tiny_run).ids("train"))
    moderate = cache_features(tiny_run, settings_with("moderate"))
    before = load_cached(tiny_run)
    meta = read_json(moderate.folder / "meta.json")["augmentation"]
    expected = augmentation_from_settings(settings_with("moderate").data, create_backbone("tiny_vit").preprocessing)
    assert meta == {"spec": expected.spec, "fingerprint": expected.fingerprint} and meta["spec"]["name"] == "moderate"

    backbone, calls = _counting(create_backbone("tiny_vit"))
    natix = cache_features(tiny_run, settings_with("natix"), backbone=backbone)
    after = load_cached(tiny_run)
    assert natix.fingerprint == moderate.fingerprint  # same folder: the clean views are reused
    assert natix.computed == sum(calls) == n_train and natix.reused == moderate.total - n_train
    assert read_json(natix.folder / "meta.json")["augmentation"]["spec"]["name"] == "natix"
    assert read_json(natix.folder / "index.json")["augmentation"] != meta["fingerprint"]
    for image_id, rows in after.rows.items():
        assert torch.equal(after.features[rows[0]], before.features[before.rows[image_id][0]])
        if 1 in rows:  # a new draw under the natix levels, not the moderate one
            assert not torch.equal(after.features[rows[1]], before.features[before.rows[image_id][1]])
    again = cache_features(tiny_run, settings_with("natix"), backbone=backbone)
    assert again.computed == 0 and sum(calls) == n_train

    # An index from before augmentations were recorded: its views are of unknown pixels and are recomputed.
    index = read_json(natix.folder / "index.json")
    atomic_write_json(natix.folder / "index.json", {k: v for k, v in index.items() if k != "augmentation"})
    assert cache_features(tiny_run, settings_with("natix"), backbone=backbone).computed == n_train


def test_without_current_json_the_only_cache_folder_is_loaded(tmp_path):
    from roadwork_cli.features.cache import write_feature_cache
    from roadwork_cli.io.run import RunDir

    run = RunDir(tmp_path / "run").ensure()
    meta = {"fingerprint": "onlyone", "backbone": {"name": "tiny_vit"}, "feature_dim": 2, "views": 0}
    write_feature_cache(run.features / "onlyone", meta, [("a" * 64, 0)], torch.ones(1, 2), shard_size=8)
    # No current.json (e.g. a cache copied by hand): the single folder is the one, named by its folder.
    assert load_cached(run).fingerprint == "onlyone"


def test_unset_batch_size_runs_batches_of_eight_on_the_cpu(tiny_run):
    """features.batch_size unset: 8 images per forward on the CPU (64 on a GPU), within each shard."""
    settings = tiny_settings(tiny_run, batch_size=None, shard_size=64)
    assert settings.features.batch_size is None
    backbone, calls = _counting(create_backbone("tiny_vit"))
    summary = cache_features(tiny_run, settings, backbone=backbone)
    n = summary.computed
    assert n > 8 and calls == [8] * (n // 8) + ([n % 8] if n % 8 else [])
