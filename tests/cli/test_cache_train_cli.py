"""`roadwork cache-features` and `roadwork train` through the real CLI (tiny_vit backbone, a few PNGs)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from split_helpers import write_splits
from typer.testing import CliRunner

from roadwork_cli.cli.app import app

runner = CliRunner()


def _make_run(root: Path, per_split: int = 6) -> Path:
    """splits.json (format: docs/architecture.md) over small PNGs whose red channel is the label, plus a broken file."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    splits: dict[str, list[str]] = {}
    samples = {}
    k = 0
    for name in ("train", "val_select", "val_calib", "test"):
        splits[name] = []
        for _ in range(per_split * (3 if name == "train" else 1)):
            pixels = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
            pixels[..., 0] = 230 * (k % 2)
            path = root / "images" / f"{k:03d}.png"
            Image.fromarray(pixels).save(path)
            image_id = hashlib.sha256(path.read_bytes()).hexdigest()
            splits[name].append(image_id)
            samples[image_id] = {"path": str(path), "label": k % 2, "source": "test", "group": image_id}
            k += 1
    broken = root / "images" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    broken_id = hashlib.sha256(broken.read_bytes()).hexdigest()
    splits["train"].append(broken_id)
    samples[broken_id] = {"path": str(broken), "label": 1, "source": "test", "group": broken_id}
    run = root / "run"
    run.mkdir()
    write_splits(run / "splits.json", splits, samples)
    return run


def test_cache_features_then_train_cached(tmp_path):
    run = _make_run(tmp_path)
    args = ["cache-features", "--run", str(run), "--backbone", "tiny_vit", "--batch-size", "8", "--workers", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fingerprint" in result.output and "unreadable" in result.output
    current = json.loads((run / "features" / "current.json").read_text())
    folder = run / "features" / current["fingerprint"]
    assert (folder / "index.json").exists() and (folder / "meta.json").exists()
    assert len(json.loads((folder / "failed.json").read_text())) == 1
    assert "tiny_vit" in (run / "config.yaml").read_text()

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 / " in again.output  # computed 0, everything reused

    result = runner.invoke(app, ["train", "--run", str(run), "--mode", "train_cached", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "best epoch" in result.output
    assert "note: 1 split image(s) failed to decode at cache-features time" in " ".join(result.output.split())
    for name in ("best.safetensors", "best.json", "last.pt"):
        assert (run / "checkpoints" / name).exists()
    with open(run / "metrics.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    with open(run / "scores" / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {"id", "label", "p_roadwork", "gate"} <= set(rows[0])


def test_unknown_train_mode_exits_2(tmp_path):
    run = _make_run(tmp_path)
    result = runner.invoke(app, ["train", "--run", str(run), "--mode", "bogus"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_train_without_cached_features_exits_2_naming_the_command(tmp_path):
    run = _make_run(tmp_path)
    result = runner.invoke(app, ["train", "--run", str(run), "--epochs", "1"])
    assert result.exit_code == 2 and "cache-features" in result.output


def test_unknown_backbone_and_missing_weights_exit_2(tmp_path):
    run = _make_run(tmp_path)
    result = runner.invoke(app, ["cache-features", "--run", str(run), "--backbone", "nope"])
    assert result.exit_code == 2 and "Unknown backbone" in result.output
    missing = tmp_path / "missing.safetensors"
    result = runner.invoke(
        app, ["cache-features", "--run", str(run), "--backbone", "tiny_vit", "--weights", str(missing)]
    )
    assert result.exit_code == 2 and "does not exist" in result.output


def _one_json_object(result) -> dict:
    """``--json``: stdout is exactly one JSON object (tables and progress went to stderr)."""
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def test_every_stage_command_prints_its_summary_as_one_json_object(tmp_path):
    split_run = tmp_path / "split_run"
    summary = _one_json_object(
        runner.invoke(app, ["split", "--source", "synthetic:24", "--run", str(split_run), "--json"])
    )
    assert summary["n_samples"] == 24 and sum(summary["splits"].values()) == 24

    run = _make_run(tmp_path)
    flags = ["--run", str(run), "--json", "--device", "cpu", "--threads", "1"]
    cached = _one_json_object(
        runner.invoke(app, ["cache-features", *flags, "--backbone", "tiny_vit", "--workers", "0"])
    )
    assert cached["backbone"] == "tiny_vit" and cached["failed"] == 1 and cached["computed"] == cached["total"] - 1
    config = (run / "config.yaml").read_text()
    assert "device: cpu" in config and "threads: 1" in config  # the flags reached runtime.* settings

    trained = _one_json_object(runner.invoke(app, ["train", *flags, "--epochs", "2"]))
    assert trained["epochs"] == 2 and trained["n_train"] == 18
    assert all(Path(path).is_file() for path in trained["scores"].values())

    calibrated = _one_json_object(runner.invoke(app, ["calibrate", "--run", str(run), "--allow-infeasible", "--json"]))
    assert calibrated["params_path"] == str(run / "calibration" / "scrc_params.json")
    assert calibrated["feasible"] is False  # 6 calibration images cannot certify 2 % FNR

    report = _one_json_object(runner.invoke(app, ["evaluate", *flags]))
    assert report["n"] == 6 and {"coverage", "guarantee"} <= set(report)

    exported = _one_json_object(runner.invoke(app, ["export", "--run", str(run), "--allow-uncertified", "--json"]))
    assert exported["bundle"] == str(run / "bundle.tar") and "model.json" in exported["members"]


def test_device_cuda_without_a_gpu_is_a_usage_error_in_one_sentence(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has one
    run = _make_run(tmp_path, per_split=1)
    args = ["cache-features", "--run", str(run), "--backbone", "tiny_vit", "--workers", "0", "--device", "cuda"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "error: --device cuda asks for a CUDA GPU, but torch sees none on this machine" in message
    assert "RuntimeError" not in message and "Traceback" not in message
    assert not (run / "features" / "current.json").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--per-class", "5", "--device", "cuda"],
        ["train", "--device", "cuda:0"],
        ["evaluate", "--device", "cuda"],
        ["predict", "img.jpg", "--bundle", "missing.tar", "--device", "cuda"],
    ],
)
def test_every_computing_command_refuses_a_missing_gpu_before_any_work(tmp_path, monkeypatch, argv):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    result = runner.invoke(app, [*argv, "--run", str(run)] if argv[0] != "predict" else argv)
    assert result.exit_code == 2, result.output
    assert "asks for a CUDA GPU, but torch sees none" in " ".join(result.output.split())
    assert not (run / "splits.json").exists()  # the demo did not split first
