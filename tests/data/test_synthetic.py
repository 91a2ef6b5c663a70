"""Synthetic scenes: deterministic per seed, different across labels, roadwork inside the centre crop."""

import numpy as np
import pytest

from roadwork_cli.config import DataSettings
from roadwork_cli.data.images import load_image
from roadwork_cli.data.synthetic import CENTRE_MARGIN, _render, render_dataset, render_scene, scene_seed


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_deterministic_for_a_seed_and_different_across_seeds_and_labels():
    a, b = render_scene(11, 1), render_scene(11, 1)
    assert a.size == (320, 240) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(render_scene(11, 0))).mean() > 5
    assert np.abs(pixels(a) - pixels(render_scene(12, 1))).mean() > 5
    small = render_scene(3, 0, size=(96, 64), jpeg_quality=40)
    assert small.size == (96, 64)
    assert np.array_equal(pixels(small), pixels(render_scene(3, 0, size=(96, 64), jpeg_quality=40)))
    with pytest.raises(ValueError):
        render_scene(0, 2)


def test_positives_have_cues_inside_the_centre_square_and_negatives_none():
    width, height = 320, 240
    side = height * CENTRE_MARGIN
    x0, y0, x1, y1 = (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2
    for seed in range(40):
        _, boxes = _render(seed, 1, (width, height), None)
        assert boxes, seed
        for bx0, by0, bx1, by1 in boxes:
            assert x0 - 0.5 <= bx0 < bx1 <= x1 + 0.5 and y0 - 0.5 <= by0 < by1 <= y1 + 0.5, (seed, boxes)
        assert _render(seed, 0, (width, height), None)[1] == []


def test_positive_scenes_carry_more_roadwork_orange():
    def orange_share(image) -> float:
        rgb = pixels(image)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        return float(((r > 180) & (g > 60) & (g < 150) & (b < 80)).mean())

    pos = np.mean([orange_share(render_scene(scene_seed(0, i), 1)) for i in range(30)])
    neg = np.mean([orange_share(render_scene(scene_seed(0, i), 0)) for i in range(30)])
    assert pos > neg > 0  # negatives have orange look-alikes too, positives more


def test_render_dataset_writes_loadable_files_deterministically(tmp_path):
    settings = DataSettings(seed=5, synthetic_size=(80, 60))
    items = render_dataset(tmp_path / "a", 4, settings)
    again = render_dataset(tmp_path / "b", 4, settings)
    assert [label for _, label in items] == [0, 1, 0, 1]
    for (path_a, _), (path_b, _) in zip(items, again, strict=True):
        assert open(path_a, "rb").read() == open(path_b, "rb").read()
        assert load_image(path_a).size == (80, 60)
    png = render_dataset(tmp_path / "c", 2, DataSettings(seed=5, synthetic_size=(80, 60), synthetic_jpeg=False))
    assert png[0][0].endswith(".png")
