"""The NATIX miner: the remap of p, its reward-optimal threshold, and ``export --natix`` run by a stand-in miner.

The subnet is not installed: a stand-in ``base_miner`` package gives ``FeatureDetector`` and ``DETECTOR_REGISTRY``
the subnet's interface (``__init__(model_name, config_name, device)`` calls ``load_model``; the registry's
``register_module(module_name=...)`` decorator), and the image goes the validator's way: a 224x224 JPEG, base64,
decoded by PIL as the miner's ``forward_image`` does.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import itertools
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.errors import UsageError
from roadwork_cli.natix import (
    FALLBACK,
    REGISTRY_NAME,
    NatixRemap,
    cross_validate_threshold,
    optimal_threshold,
    weighted_reward,
)
from roadwork_cli.robustness import natix_reward
from tests.cli.cli_helpers import jsonl_records, make_tiny_run

STAND_IN = {
    "base_miner/__init__.py": "",
    "base_miner/registry.py": """
        class Registry(dict):
            def register_module(self, module_name):
                def add(cls):
                    if module_name in self:
                        raise KeyError(f"{module_name} is already registered")
                    self[module_name] = cls
                    return cls
                return add

        DETECTOR_REGISTRY = Registry()
        DETECTOR_REGISTRY["ROADWORK"] = object  # the subnet's own entry, which ours must not collide with
    """,
    "base_miner/detectors/__init__.py": """
        from abc import ABC, abstractmethod

        class FeatureDetector(ABC):
            def __init__(self, model_name, config_name, device="cpu"):
                self.model_name, self.config_name, self.device = model_name, config_name, device
                self.load_model()

            @abstractmethod
            def load_model(self): ...

            @abstractmethod
            def __call__(self, image) -> float: ...
    """,
}


# ----------------------------------------------------------------------------------------------- the remap
@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.62, 0.97])
def test_remap_is_monotone_in_range_and_rounds_like_the_threshold(threshold):
    remap = NatixRemap(threshold)
    p = np.concatenate([np.linspace(0, 1, 20001), [threshold, np.nextafter(threshold, 0), 0.0, 1.0]])
    p.sort()
    out = remap(p)
    assert np.all(np.diff(out) >= 0)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # the validator's np.round of the remapped p is exactly stage 1's p >= t
    assert np.array_equal(np.round(out) >= 1, p >= threshold)
    assert remap(threshold) == pytest.approx(0.5 + remap.epsilon)
    assert remap(0.0) == 0.0 and remap(1.0) == 1.0
    assert 0.5 < remap(threshold) <= 0.5 + 2 * remap.epsilon  # "just above 0.5"


def test_remap_refuses_thresholds_outside_the_open_interval():
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(UsageError):
            NatixRemap(bad)


def test_weighted_reward_with_unit_weights_is_the_validators_reward():
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        d = np.where(rng.random(60) < 0.8, y, 1 - y)
        expected = natix_reward(matthews_corrcoef(y, d), accuracy_score(y, d))
        assert weighted_reward(d, y, np.ones(60)) == pytest.approx(expected, abs=1e-12)


def test_optimal_threshold_beats_every_other_cut():
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.7).astype(float)  # roadwork-heavy, as NATIX's stream
    p = np.clip(0.25 * y + rng.normal(0.3, 0.15, n), 0, 1)  # the ranking is good, 0.5 is a poor cut
    w = rng.choice([0.1, 0.3], n)
    t, reward = optimal_threshold(p, y, w)
    grid = np.linspace(0, 1, 2001)
    brute = max(weighted_reward((p >= g).astype(float), y, w) for g in grid)
    assert reward == pytest.approx(weighted_reward((p >= t).astype(float), y, w))
    assert reward >= brute - 1e-12
    assert reward > weighted_reward((p > 0.5).astype(float), y, w)  # the remap is worth having on such scores
    assert not np.any(p == t)  # the threshold sits between scores


def test_optimal_threshold_ignores_nan_and_keeps_ties_near_half():
    t, _ = optimal_threshold(np.array([0.9, 0.8, np.nan, 0.1]), np.array([1, 1, 0, 0]))
    assert 0.1 < t < 0.8
    assert abs(t - 0.5) <= abs(0.45 - 0.5)  # every cut in (0.1, 0.8) is perfect; the one nearest 0.5 wins


def test_cross_validation_keeps_a_real_shift_and_refuses_too_few_images():
    rng = np.random.default_rng(5)
    n = 300
    y = (rng.random(n) < 0.6).astype(float)
    p = np.clip(0.8 + 0.15 * (2 * y - 1) + rng.normal(0, 0.05, n), 0, 1)  # separable around 0.8, not 0.5
    ids = np.array([f"img{i // 4}" for i in range(n)])  # four views per image stay in one fold
    check = cross_validate_threshold(p, y, np.ones(n), ids)
    assert check["keep"] and 0.7 < check["fitted"] < 0.9
    assert check["reward_fitted_out_of_fold"] > check["reward_plain_p"]
    few = cross_validate_threshold(p[:36], y[:36], np.ones(36), ids[:36])  # 9 images < 2 x 5 folds
    assert not few["keep"]


def test_cross_validation_rarely_keeps_a_threshold_fitted_to_noise():
    kept = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        n = 160
        y = (rng.random(n) < 0.5).astype(float)
        p = rng.random(n)  # no signal: every threshold is as good as any other
        ids = np.array([f"img{i // 4}" for i in range(n)])
        kept += cross_validate_threshold(p, y, np.ones(n), ids, seed=seed)["keep"]
    assert kept <= 14  # a fair coin would keep about half; 14 of 20 or more has probability < 6 %


# ----------------------------------------------------------------------------------------------- export --natix
def jpeg_224(colour) -> bytes:
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (224, 224, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def natix_dir(tmp_path_factory) -> Path:
    """A tiny split and run, exported with ``--natix``."""
    root = tmp_path_factory.mktemp("natix")
    run = make_tiny_run(root / "run")
    for label, colours in (
        ("roadwork", [(230, 120, 20), (250, 90, 30)]),
        ("no_roadwork", [(60, 80, 90), (40, 40, 40)]),
    ):
        folder = root / "data" / label
        folder.mkdir(parents=True)
        for i, colour in enumerate(itertools.islice(itertools.cycle(colours), 12)):
            (folder / f"{label}_{i}.jpg").write_bytes(jpeg_224(tuple(c + i for c in colour)))
    result = CliRunner().invoke(
        app, ["split", "--source", str(root / "data"), "--run", str(run.root), "--fractions", "0.25,0.5,0.125,0.125"]
    )
    assert result.exit_code == 0, result.output
    out = root / "miner"
    result = CliRunner().invoke(app, ["export", "--run", str(run.root), "--natix", str(out)])
    assert result.exit_code == 0, result.output
    assert "NATIX miner" in result.output
    return out


@pytest.fixture()
def stand_in_miner(tmp_path, monkeypatch, natix_dir):
    """The generated detector module, imported as the subnet would, over the stand-in base_miner package."""
    for name, text in STAND_IN.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "base_miner" or m.startswith("base_miner.")]:
        monkeypatch.delitem(sys.modules, name)
    module_path = natix_dir / "base_miner" / "detectors" / "roadwork_stage1_detector.py"
    spec = importlib.util.spec_from_file_location("roadwork_stage1_detector", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from base_miner.registry import DETECTOR_REGISTRY

    return DETECTOR_REGISTRY


def test_export_natix_writes_the_miners_files(natix_dir):
    import json

    card = json.loads((natix_dir / "model_card.json").read_text())
    assert {"model_name", "description", "version", "submitted_by", "submission_time"} <= set(card)
    remap = json.loads((natix_dir / "natix_remap.json").read_text())
    assert 0 < remap["threshold"] < 1
    measured = remap["measured"]
    assert measured["split"] == "val_select" and len(measured["natix_levels"]) == 4
    for key in ("all_levels", "level_0", "level_3"):
        assert {"reward_plain_p", "reward_remapped", "n"} <= set(measured[key])
    assert {"keep", "folds", "fitted"} <= set(measured["cross_validation"])
    held_out = measured["held_out"]  # the threshold measured where it was not chosen, too
    assert held_out["split"] == "test" and held_out["all_levels"]["n"] >= 4
    # on the data it was placed on, the remap never loses to plain rounding
    assert measured["all_levels"]["reward_remapped"] >= measured["all_levels"]["reward_plain_p"] - 1e-9
    assert (natix_dir / "roadwork_stage1.tar").is_file()
    assert (natix_dir / "base_miner" / "detectors" / "configs" / "roadwork_stage1.yaml").is_file()
    assert REGISTRY_NAME in (natix_dir / "README.md").read_text()


def test_stand_in_miner_answers_the_remapped_p_of_predict(stand_in_miner, natix_dir, tmp_path):
    import json

    assert REGISTRY_NAME != "ROADWORK" and stand_in_miner["ROADWORK"] is object  # the subnet's entry is untouched
    detector = stand_in_miner[REGISTRY_NAME]()
    remap = NatixRemap.from_dict(json.loads((natix_dir / "natix_remap.json").read_text()))
    for colour in [(240, 110, 25), (50, 70, 80), (128, 128, 128)]:
        payload = base64.b64encode(jpeg_224(colour)).decode()  # as the validator sends it
        image = Image.open(io.BytesIO(base64.b64decode(payload)))  # as the miner's forward_image decodes it
        answer = detector(image)
        assert isinstance(answer, float) and 0.0 <= answer <= 1.0
        # predict on the same pixels (a lossless copy of the decoded image)
        png = tmp_path / f"same_{colour[0]}.png"
        image.convert("RGB").save(png)
        result = CliRunner().invoke(
            app, ["predict", str(png), "--bundle", str(natix_dir / "roadwork_stage1.tar"), "--format", "jsonl"]
        )
        assert result.exit_code == 0, result.output
        p = [r for r in jsonl_records(result.stdout) if "path" in r][0]["p_roadwork"]
        assert answer == pytest.approx(remap(p), abs=1e-5)  # predict rounds p to 6 decimals


def test_stand_in_miner_answers_bad_images_without_raising(stand_in_miner):
    detector = stand_in_miner[REGISTRY_NAME]()
    data = jpeg_224((200, 20, 20))
    truncated = Image.open(io.BytesIO(data[: len(data) // 2]))  # the header opens; the pixels fail on load
    for bad in (truncated, None, "/etc/hostname", b"\xff\xd8\xff", Image.new("RGB", (1, 1))):
        answer = detector(bad)
        assert isinstance(answer, float) and 0.0 <= answer <= 1.0
    assert detector(truncated) == FALLBACK and detector("/etc/hostname") == FALLBACK
