"""The one decode path: draft decoding, pixels equal to the reference transform, and cache == predict features."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from split_helpers import write_splits

from roadwork_cli.data.decode import (
    DecodeRecipe,
    ImageDataset,
    create_loader,
    decode_jpeg_draft,
    jpeg_draft_size,
    load_input,
    to_model_input,
)
from roadwork_cli.data.images import decode_image
from roadwork_cli.data.preprocessing import Preprocessing


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random picture (upsampled noise), so JPEG and resizing behave as on a photo."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.BICUBIC)


def jpeg_bytes(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_draft_decode_is_used_for_large_jpegs_and_close_to_full_decode():
    prep = Preprocessing(size=64, crop_pct=1.0)
    side = jpeg_draft_size(prep)
    data = jpeg_bytes(photo(640, 480, 0), quality=95)
    drafted = decode_jpeg_draft(data, 50_000_000, side)
    assert drafted is not None and min(drafted.size) >= side and drafted.size[0] < 640  # DCT-scaled, never below
    recipe = DecodeRecipe(prep)
    clean = ImageDataset([data], recipe).clean
    full = clean(decode_image(data)).float()
    fast = clean(load_input(data, recipe)).float()
    assert float((full - fast).abs().mean()) < 4.0  # the same picture at the network's resolution (0..255 scale)
    assert decode_jpeg_draft(b"\x89PNG....", 50_000_000, side) is None  # not a JPEG: the validating path
    off = DecodeRecipe(prep, jpeg_draft=False)
    assert off.draft_side is None and load_input(data, off).size == (640, 480)


def test_demo_sized_scenes_are_below_the_draft_threshold():
    """Synthetic 320x240 scenes with the default backbone's recipe decode exactly as before (no draft)."""
    data = jpeg_bytes(photo(320, 240, 1))
    recipe = DecodeRecipe(Preprocessing(size=224, crop_pct=0.875))  # efficientnet_lite0's timm recipe
    assert np.array_equal(np.asarray(load_input(data, recipe)), np.asarray(decode_image(data)))


def test_batched_pixels_equal_the_float_eval_transform():
    from roadwork_cli.data.transforms import eval_transform

    rng = np.random.default_rng(1)
    for prep in (
        Preprocessing(size=64, crop_pct=1.0),
        Preprocessing(size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    ):
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((97, 61), (40, 130))]
        batches = list(create_loader(ImageDataset(images, DecodeRecipe(prep)), batch_size=2))
        assert len(batches) == 1
        indices, pixels, failed = batches[0]
        assert indices == [0, 1] and failed == [] and pixels.dtype == torch.uint8
        got = to_model_input(pixels, prep, torch.device("cpu"))  # (2, 3, S, S)
        expected = torch.stack([eval_transform(prep)(image) for image in images])
        assert got.shape == expected.shape and float((got - expected).abs().max()) < 1e-5


def test_bad_inputs_become_reasons_and_seeded_views_are_reproducible(tmp_path):
    from roadwork_cli.data.transforms import train_transform

    prep = Preprocessing(size=32, crop_pct=1.0)
    good = jpeg_bytes(photo(90, 70, 2))
    items = [good, b"", tmp_path / "missing.jpg", good, good]
    seeds = [None, None, None, 7, 7]
    dataset = ImageDataset(items, DecodeRecipe(prep), seeds=seeds, augment=train_transform(prep, output="uint8"))
    indices, pixels, failed = next(iter(create_loader(dataset, batch_size=5)))
    assert indices == [0, 3, 4] and [i for i, _ in failed] == [1, 2]
    assert all(reason for _, reason in failed)
    assert torch.equal(pixels[1], pixels[2]) and not torch.equal(pixels[0], pixels[1])  # same seed, same view


# ------------------------------------------------------------------------------------------ cache == predict features


def make_split_run(root, files):
    from roadwork_cli.io.run import RunDir

    run = RunDir(root).ensure()
    samples, ids = {}, []
    for i, path in enumerate(files):
        image_id = hashlib.sha256(path.read_bytes()).hexdigest()
        ids.append(image_id)
        samples[image_id] = {"path": str(path), "label": i % 2, "source": "test", "group": None}
    splits = {"train": ids[:1], "val_select": ids[1:2], "val_calib": ids[2:3], "test": ids[3:]}
    write_splits(run, splits, samples)
    return run, ids


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    sizes = [(80, 60), (130, 97), (4032, 3024), (3024, 4032), (64, 200)]
    files = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"img_{i}_{w}x{h}.jpg"
        path.write_bytes(jpeg_bytes(photo(w, h, 10 + i), quality=85))
        files.append(path)
    return files


def cached_and_predicted(run, ids, files, jpeg_draft):
    from roadwork_cli.config import Settings
    from roadwork_cli.features.cache import cache_features, load_cached
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.stage1 import Stage1Model

    settings = Settings()
    settings.model.backbone = "tiny_vit"
    settings.features.workers = 0
    settings.features.batch_size = 2
    settings.runtime.device = "cpu"
    settings.data.jpeg_draft = jpeg_draft
    summary = cache_features(run, settings)
    cached = load_cached(run, summary.fingerprint)
    rows = torch.stack([cached.features[cached.rows[i][0]] for i in ids])  # (N, D), stored as float16

    backbone = create_backbone("tiny_vit")
    head = SelectiveHead(backbone.feature_dim, hidden=0, dropout=0.0)
    model = Stage1Model(backbone, head, None, info={"recipe": cached.meta["recipe"]}, device="cpu")
    predicted = torch.zeros_like(rows)
    for indices, pixels, failed in model.loader(files, batch_size=3):  # predict's loader and forward
        assert failed == []
        predicted[indices] = model.embed(pixels).cpu()
    return rows, predicted, cached.meta["recipe"]


def test_predict_path_features_equal_the_cached_ones_on_small_and_12mp_jpegs(tmp_path, images):
    run, ids = make_split_run(tmp_path / "run", images)
    cached, predicted, recipe = cached_and_predicted(run, ids, images, jpeg_draft=None)
    assert recipe["decode"]["jpeg_draft"] is True and recipe["decode"]["draft_side"] == 64
    # The cache stores float16: predict's float32 features round to exactly the cached values (or one ulp away when
    # another batch composition moves the float32 result across a rounding boundary).
    diff = (predicted - cached).abs()
    ulp = torch.finfo(torch.float16).eps * cached.abs().clamp_min(2.0**-14)
    assert bool((diff <= ulp).all()), float(diff.max())
    assert bool((predicted.half().float() - cached).abs().le(ulp).all())

    # The test can fail: full decoding of the 12 MP JPEGs gives other features than the draft path.
    full_run, _ = make_split_run(tmp_path / "full", images)
    full_cached, _, full_recipe = cached_and_predicted(full_run, ids, images, jpeg_draft=False)
    assert full_recipe["decode"]["jpeg_draft"] is False
    assert torch.equal(full_cached[:2], cached[:2])  # small images: no draft either way
    assert float((full_cached[2:4] - cached[2:4]).abs().max()) > 1e-3
