"""Augmentation registry: NATIX challenge levels (bounds, rates, faithfulness), timm presets, seeding."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from roadwork_cli.config import DataSettings
from roadwork_cli.data.natix import (
    CHALLENGE_JPEG_QUALITY,
    NATIX_BLUR_SIGMA,
    NATIX_CONTRAST,
    NATIX_CROP_RATIO,
    NATIX_JPEG_QUALITY,
    NATIX_JPEG_SCALE,
    NATIX_NOISE_STD,
    NATIX_SATURATION,
    NatixParams,
    apply_natix_params,
    natix_level,
    sample_natix_params,
)
from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.data.transforms import (
    NatixAugmentation,
    augment_seed,
    augmentation_from_settings,
    create_augmentation,
    eval_transform,
    list_augmentations,
    normalize_batch,
)
from roadwork_cli.errors import UnknownNameError

PRE = Preprocessing(size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear", crop_pct=0.875)
DRAWS = 4000
ALPHA = 1e-3  # per statistical check; the draws are seeded, so a pass is a fixed fact, not a coin toss


def _image(width=60, height=40, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _params(level: int, side: int = 224, n: int = DRAWS, seed: int = 0) -> list[NatixParams]:
    rng = np.random.default_rng(seed)
    return [sample_natix_params(level, side, rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name():
    assert list_augmentations() == ["aggressive", "moderate", "natix", "none"]
    with pytest.raises(UnknownNameError, match="Unknown augmentation 'heavy'"):
        create_augmentation("heavy", PRE)
    with pytest.raises(ValueError):
        create_augmentation("natix", PRE, output="half")
    with pytest.raises(ValueError):
        create_augmentation("natix", PRE, levels=(1.0, -0.5, 0.5, 0.0))
    with pytest.raises(ValueError):
        sample_natix_params(4, 32, np.random.default_rng(0))


def test_settings_pick_the_augmentation_and_the_level_mix():
    natix = augmentation_from_settings(DataSettings(augment="natix", natix_levels=(0.0, 0.5, 0.5, 0.0)), PRE)
    assert isinstance(natix, NatixAugmentation)
    np.testing.assert_allclose(natix.mix, [0.0, 0.5, 0.5, 0.0])
    assert augmentation_from_settings(DataSettings(augment="aggressive"), PRE, output="uint8").output == "uint8"
    with pytest.raises(ValueError, match="natix_levels"):
        DataSettings(natix_levels=(0.5, 0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------------------------- NATIX levels


def test_level0_is_the_deterministic_square_centre_crop():
    image = _image(60, 40)
    crop = image.crop((10, 0, 50, 40))
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(_pixels(natix_level(image, 0, rng, size=None)), _pixels(crop))
    # Level 0 draws nothing: the generator's stream is untouched, and any generator gives the same pixels.
    assert rng.random() == np.random.default_rng(1).random()
    resized = crop.resize((24, 24), Image.BICUBIC)
    for seed in range(3):
        out = natix_level(image, 0, np.random.default_rng(seed), size=24)
        np.testing.assert_array_equal(_pixels(out), _pixels(resized))
    tall = _image(30, 70)
    np.testing.assert_array_equal(_pixels(natix_level(tall, 0, rng, size=None)), _pixels(tall.crop((0, 20, 30, 50))))


def test_level1_rotation_and_crop_stay_in_bounds_and_span_them():
    side = 2000  # large, so rounding the crop sides up barely moves the area fractions
    params = _params(1, side=side)
    angles = np.array([p.angle for p in params])
    assert np.all(np.abs(angles) <= 20.0)
    # Uniform on [-20, 20]: Kolmogorov-Smirnov against that law.
    assert stats.kstest(angles, stats.uniform(loc=-20, scale=40).cdf).pvalue > ALPHA
    boxes = np.array([p.crop for p in params], dtype=np.float64)  # (n, 4) left, top, width, height
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, :2] + boxes[:, 2:] <= side)
    fractions = boxes[:, 2] * boxes[:, 3] / side**2
    assert fractions.min() >= 0.2 and fractions.max() <= 1.0
    assert stats.kstest(fractions, stats.uniform(loc=0.2, scale=0.8).cdf).pvalue > ALPHA
    aspects = boxes[:, 2] / boxes[:, 3]
    assert aspects.min() >= NATIX_CROP_RATIO[0] - 2e-3 and aspects.max() <= NATIX_CROP_RATIO[1] + 2e-3


def test_level1_flips_both_ways_at_half_rate_independently():
    params = _params(1, seed=7)
    hflips = sum(p.hflip for p in params)
    vflips = sum(p.vflip for p in params)
    both = sum(p.hflip and p.vflip for p in params)
    assert stats.binomtest(hflips, DRAWS, 0.5).pvalue > ALPHA
    assert stats.binomtest(vflips, DRAWS, 0.5).pvalue > ALPHA
    assert stats.binomtest(both, DRAWS, 0.25).pvalue > ALPHA


def test_levels_are_cumulative_and_their_degradations_in_range():
    for p in _params(0, n=20):
        assert p == NatixParams(level=0)
    level1 = _params(1, n=200)
    assert all(p.saturation == 1.0 and p.jpeg_quality is None and p.noise_std == 0.0 for p in level1)
    level2 = _params(2, n=500)
    assert all(p.crop is not None and p.noise_std == 0.0 and p.blur_sigma == 0.0 for p in level2)
    for p in level2:
        assert NATIX_SATURATION[0] <= p.saturation <= NATIX_SATURATION[1]
        assert NATIX_CONTRAST[0] <= p.contrast <= NATIX_CONTRAST[1]
        assert NATIX_JPEG_QUALITY[0] <= p.jpeg_quality <= NATIX_JPEG_QUALITY[1]
        assert NATIX_JPEG_SCALE[0] <= p.jpeg_scale <= NATIX_JPEG_SCALE[1]
    for p in _params(3, n=500):
        assert p.crop is not None and p.jpeg_quality is not None
        assert NATIX_NOISE_STD[0] <= p.noise_std <= NATIX_NOISE_STD[1]
        assert NATIX_BLUR_SIGMA[0] <= p.blur_sigma <= NATIX_BLUR_SIGMA[1]


def test_drawn_parameters_are_what_gets_applied():
    square = _image(48, 48, seed=3)
    rng = np.random.default_rng(0)
    box = (5, 8, 30, 24)
    expected = square.crop((5, 8, 35, 32)).resize((48, 48), Image.BICUBIC)
    out = apply_natix_params(square, NatixParams(level=1, crop=box, hflip=True), rng)
    np.testing.assert_array_equal(_pixels(out), _pixels(expected)[:, ::-1])
    out = apply_natix_params(square, NatixParams(level=1, vflip=True), rng)
    np.testing.assert_array_equal(_pixels(out), _pixels(square)[::-1])
    # Counter-clockwise rotation: a quarter turn is numpy's rot90 (up to bilinear rounding).
    out = apply_natix_params(square, NatixParams(level=1, angle=90.0), rng)
    assert np.abs(_pixels(out) - np.rot90(_pixels(square))).max() <= 1
    # A 20 degree turn blackens the corners (the validators' fill), not the centre.
    out = _pixels(apply_natix_params(Image.new("RGB", (48, 48), (200, 200, 200)), NatixParams(angle=20.0), rng))
    assert out[0, 0].max() == 0 and out[24, 24].min() == 200


def test_colour_jpeg_noise_and_blur_change_pixels_as_drawn():
    rng = np.random.default_rng(0)
    colourful = _image(64, 64, seed=5)
    grey = apply_natix_params(colourful, NatixParams(level=2, saturation=0.0), rng)
    channels = _pixels(grey)
    assert np.abs(channels[..., 0] - channels[..., 1]).max() <= 1  # no saturation left
    flat_contrast = _pixels(apply_natix_params(colourful, NatixParams(level=2, contrast=0.0), rng))
    assert flat_contrast.std() < 1.0
    jpeg = _pixels(apply_natix_params(colourful, NatixParams(level=2, jpeg_quality=20, jpeg_scale=0.5), rng))
    assert np.abs(jpeg - _pixels(colourful)).mean() > 10  # noise-like texture does not survive a coarse JPEG
    flat = Image.new("RGB", (128, 128), (128, 128, 128))
    noisy = _pixels(apply_natix_params(flat, NatixParams(level=3, noise_std=10.0), rng)).astype(np.float64)
    # 49k samples of N(128, 10) rounded: the sample std is within a few percent of 10.
    assert abs(noisy.std() - 10.0) < 0.3 and abs(noisy.mean() - 128) < 0.3
    blurred = _pixels(apply_natix_params(colourful, NatixParams(level=3, blur_sigma=1.5), rng))
    assert blurred.std() < 0.7 * _pixels(colourful).std()


def test_level_mix_is_drawn_at_the_configured_rates():
    natix = create_augmentation("natix", PRE, levels=(0.1, 0.2, 0.3, 0.4))
    counts = np.bincount([natix.draw_level(np.random.default_rng(s)) for s in range(DRAWS)], minlength=4)
    assert stats.chisquare(counts, DRAWS * np.array([0.1, 0.2, 0.3, 0.4])).pvalue > ALPHA
    fixed = create_augmentation("natix", PRE, level=2)
    assert {fixed.draw_level(np.random.default_rng(s)) for s in range(50)} == {2}


def test_a_fixed_level_challenge_is_natix_level_then_the_224_jpeg():
    image = _image(320, 240, seed=2)
    for level in range(4):
        challenge = create_augmentation("natix", PRE, level=level).challenge(image, seed=11)
        assert challenge.size == (224, 224)
        direct = natix_level(image, level, np.random.default_rng(11))
        buffer = io.BytesIO()
        direct.save(buffer, "JPEG", quality=CHALLENGE_JPEG_QUALITY)
        np.testing.assert_array_equal(_pixels(challenge), _pixels(Image.open(buffer).convert("RGB")))


# ------------------------------------------------------------------------------------------- seeding and output


@pytest.mark.parametrize("name", ["none", "moderate", "aggressive", "natix"])
@pytest.mark.parametrize("output", ["float", "uint8"])
def test_same_seed_same_pixels_other_seed_other_pixels(name, output):
    augmentation = create_augmentation(name, PRE, output=output)
    image = _image()
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a, b = augmentation(image, seed=123), augmentation(image, seed=123)
    # The caller's global generators are untouched (timm draws from all three).
    assert random.getstate() == states[0]
    np.testing.assert_array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    expected_shape = (3, 32, 32) if output == "float" else (32, 32, 3)
    assert a.shape == expected_shape and a.dtype == (torch.float32 if output == "float" else torch.uint8)
    assert torch.equal(a, b)
    others = [augmentation(image, seed=s) for s in range(5)]
    if name == "none":
        assert all(torch.equal(a, o) for o in others)
    else:
        assert all(not torch.equal(a, o) for o in others)


def test_without_a_seed_torch_manual_seed_reproduces_the_view():
    augmentation, image = create_augmentation("aggressive", PRE), _image()
    torch.manual_seed(5)
    a = augmentation(image)
    torch.manual_seed(5)
    assert torch.equal(a, augmentation(image))


@pytest.mark.parametrize("name", ["moderate", "aggressive"])
def test_timm_presets_differ_from_eval_and_uint8_matches_float(name):
    image = _image(80, 60, seed=4)
    clean = eval_transform(PRE)(image)
    augmentation = create_augmentation(name, PRE)
    assert all(not torch.allclose(augmentation(image, seed=s), clean, atol=1e-3) for s in range(8))
    # Without random erasing (which may leave the pixel range) uint8 + normalize_batch equals the float path.
    floats = create_augmentation(name, PRE, re_prob=0.0)
    pixels = create_augmentation(name, PRE, output="uint8", re_prob=0.0)
    for seed in range(4):
        batch = normalize_batch(pixels(image, seed=seed)[None], PRE)[0]
        torch.testing.assert_close(batch, floats(image, seed=seed), atol=1e-4, rtol=0)


def test_preset_overrides_reach_timm():
    augmentation = create_augmentation("moderate", PRE, vflip=1.0, hflip=0.0, scale=(1.0, 1.0), auto_augment=None)
    names = [type(t).__name__ for t in augmentation.transform.transforms]
    assert "RandomVerticalFlip" in names and "RandomHorizontalFlip" not in names and "RandAugment" not in names


def test_augment_seed_depends_on_id_view_and_epoch_only():
    seeds = {augment_seed(i, v, e) for i in ("a" * 64, "b" * 64) for v in (1, 2) for e in (0, 1, 2)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert augment_seed("a" * 64, 1, 2) == augment_seed("a" * 64, 1, epoch=2)


def test_epoch_zero_seeds_keep_the_key_cached_views_were_drawn_with():
    import hashlib

    key = hashlib.sha256(("c" * 64 + ":3").encode()).digest()[:8]  # "<id>:<view>", as feature caches have stored
    assert augment_seed("c" * 64, 3) == int.from_bytes(key, "little") & (2**63 - 1)


def test_the_fingerprint_tells_pixel_changing_options_apart():
    moderate = create_augmentation("moderate", PRE)
    assert moderate.spec["name"] == "moderate" and moderate.spec["timm"]["scale"] == [0.35, 1.0]
    assert moderate.fingerprint == create_augmentation("moderate", PRE, output="uint8").fingerprint
    prints = {
        moderate.fingerprint,
        create_augmentation("moderate", PRE, re_prob=0.0).fingerprint,
        create_augmentation("aggressive", PRE).fingerprint,
        create_augmentation("none", PRE).fingerprint,
        create_augmentation("natix", PRE).fingerprint,
        create_augmentation("natix", PRE, levels=(0.4, 0.2, 0.2, 0.2)).fingerprint,
    }
    assert len(prints) == 6
    json.dumps(create_augmentation("natix", PRE).spec)  # JSON-able, for a cache's meta.json


@pytest.mark.parametrize("name", ["moderate", "aggressive", "natix"])
def test_odd_images_still_give_a_full_size_view(name):
    augmentation = create_augmentation(name, PRE, output="uint8")
    odd = [Image.new("RGB", (1, 1), (9, 9, 9)), _image(3, 200), _image(50, 50).convert("L"), _image().convert("RGBA")]
    for seed, image in enumerate(odd):
        assert augmentation(image, seed=seed).shape == (32, 32, 3)
