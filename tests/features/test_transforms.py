"""eval/train transforms built from a backbone's Preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.data.transforms import eval_transform, normalize_batch, train_transform

PRE = Preprocessing(size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear", crop_pct=0.8)


def _image(width=60, height=40, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_eval_transform_resizes_crops_and_normalises():
    x = eval_transform(PRE)(_image())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # A flat grey image normalises to exactly (v - mean) / std per channel.
    flat = eval_transform(PRE)(Image.new("RGB", (50, 70), (255, 255, 255)))
    expected = (1.0 - torch.tensor(PRE.mean)) / torch.tensor(PRE.std)
    torch.testing.assert_close(flat.mean(dim=(1, 2)), expected)


def test_crop_pct_drops_the_border():
    # A white frame around black: with crop_pct 0.5 the centre crop sees only black.
    pixels = np.full((100, 100, 3), 255, dtype=np.uint8)
    pixels[25:75, 25:75] = 0
    pre = Preprocessing(size=20, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", crop_pct=0.5)
    assert eval_transform(pre)(Image.fromarray(pixels)).max() == 0
    whole = Preprocessing(size=20, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", crop_pct=1.0)
    assert eval_transform(whole)(Image.fromarray(pixels)).max() == 1


def test_uint8_path_matches_the_float_path():
    images = [_image(seed=s) for s in range(3)]
    floats = torch.stack([eval_transform(PRE)(im) for im in images])
    pixels = torch.stack([eval_transform(PRE, output="uint8")(im) for im in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32, 3)
    batch = normalize_batch(pixels, PRE)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch, floats, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        eval_transform(PRE, output="half")


def test_train_transform_is_random_but_reproducible_under_a_seed():
    image, transform = _image(), train_transform(PRE)
    torch.manual_seed(7)
    a = transform(image)
    torch.manual_seed(7)
    b = transform(image)
    c = transform(image)
    assert a.shape == (3, 32, 32)
    torch.testing.assert_close(a, b)
    assert not torch.equal(b, c)
