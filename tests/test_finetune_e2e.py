"""Fine-tuned runs end to end: split -> train --mode train -> calibrate -> export -> predict, bundle == run scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from roadwork_cli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``roadwork/`` and ``no_roadwork/`` class folders of small noisy images (red-ish vs blue-ish)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(1)
    for label, name in ((1, "roadwork"), (0, "no_roadwork")):
        (root / name).mkdir()
        for k in range(30):
            pixels = rng.integers(0, 90, (40, 48, 3)).astype(np.uint8)
            pixels[..., 0 if label else 2] += 120
            Image.fromarray(pixels).save(root / name / f"{name}_{k}.png")
    return root


def write_config(path: Path, backbone: str, method: str, run: Path) -> Path:
    config = {
        "data": {"augment": "moderate", "fractions": [0.5, 0.15, 0.2, 0.15]},
        "model": {"backbone": backbone, "head_hidden": 16, "peft": {"method": method, "rank": 4}},
        "features": {"workers": 0, "batch_size": 16},
        "train": {"mode": "train", "epochs": 2, "batch_size": 8, "lr": 0.01, "optimizer": "fsam"},
        "calibration": {"fnr": 0.2, "coverage": 0.5, "delta": 0.2, "allow_infeasible": True},
        "export": {"allow_uncertified": True},
        "runtime": {"run": str(run), "device": "cpu", "threads": 1},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def run_scores(run: Path, split: str) -> dict[str, float]:
    with open(run / "scores" / f"{split}.csv", newline="") as handle:
        return {row["id"]: float(row["p_roadwork"]) for row in csv.DictReader(handle)}


@pytest.mark.parametrize(("backbone", "method"), [("hf_dinov3", "doran"), ("tiny_vit", "lora")])
def test_finetuned_run_exports_a_bundle_that_predicts_the_run_scores(
    tmp_path, image_folder, hf_dinov3_dir, backbone, method
):
    from roadwork_cli import load_bundle
    from roadwork_cli.io.bundle import read_bundle
    from roadwork_cli.io.run import RunDir

    run = tmp_path / "run"
    name = f"hf:{hf_dinov3_dir}" if backbone == "hf_dinov3" else backbone
    config = str(write_config(tmp_path / "settings.yaml", name, method, run))
    cli("split", "--config", config, "--source", str(image_folder))
    cli("train", "--config", config)
    cli("calibrate", "--config", config)
    cli("export", "--config", config)

    contents = read_bundle(RunDir(run).bundle)
    record = contents.json("model.json")
    assert record["adapters"]["method"] == method
    assert record["backbone"]["fingerprint"] == record["adapters"]["merged_fingerprint"]
    assert record["backbone"]["weights_member"] == "backbone.safetensors" and "backbone.safetensors" in contents.members

    splits = json.loads((run / "splits.json").read_text())
    test_ids = splits["splits"]["test"]
    paths = [splits["samples"][i]["path"] for i in test_ids]
    model = load_bundle(RunDir(run).bundle, device="cpu")
    p_raw, _, errors = model.raw_scores(paths)
    expected = run_scores(run, "test")
    assert not any(errors) and len(expected) == len(test_ids)
    assert np.abs(p_raw - np.array([expected[i] for i in test_ids])).max() <= 1e-4

    output = cli("predict", *paths[:3], "--bundle", str(RunDir(run).bundle), "--format", "jsonl")
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 3 and all(line["decision"] in ("roadwork", "no_roadwork", "defer") for line in lines)
