"""benchmarks/gpu_check.py: its CPU dry run runs every section and writes the JSON a GPU host's run writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout)["train"] == result["train"]  # stdout repeats the file (without the profile)
    return result


def test_every_section_ran_without_error(dry_run):
    assert dry_run["dry_run"] is True and dry_run["host"]["device"] == "cpu"
    for section in ("train", "profile", "decode", "ddp", "bf16"):
        assert "error" not in dry_run[section], dry_run[section].get("traceback")
        assert dry_run[section]["section_seconds"] >= 0


def test_train_section_compares_the_live_loop_with_the_bare_step(dry_run):
    train = dry_run["train"]
    assert train["adapters"] == "doran" and train["optimizer"] == "fsam" and train["precision"] == "bfloat16"
    assert len(train["epoch_seconds"]) == dry_run["plan"]["epochs"]
    live, bare, two = train["live_images_per_s"], train["bare_images_per_s"], train["bare_two_pass_images_per_s"]
    assert live > 0 and bare > 0 and two > 0
    assert train["ratio"] == pytest.approx(live / bare, rel=0.02)
    assert train["ratio_vs_bare_two_pass"] == pytest.approx(live / two, rel=0.02)
    assert train["meets_goal"] == (train["ratio"] >= train["goal"] == 0.6)
    assert "skipped" in train["compiled"]  # compiling is measured on GPU hosts only


def test_profile_names_the_host_ops(dry_run):
    profile = dry_run["profile"]
    ops = profile["top_host_ops"]
    assert 0 < len(ops) <= 15 and profile["steps"] >= 1 and profile["wall_ms"] > 0
    assert [op["self_cpu_ms"] for op in ops] == sorted((op["self_cpu_ms"] for op in ops), reverse=True)
    assert any("mm" in op["name"] or "linear" in op["name"] for op in ops)  # the forward's matmuls are in there
    assert profile["top_device_ops"] == [] and profile["device_busy_ms"] is None  # no GPU in the dry run


def test_decode_section_checks_equality_and_predict_throughput(dry_run):
    decode = dry_run["decode"]
    equality = decode["equality"]
    assert equality["ok"] is True and equality["images"] >= 4
    assert equality["max_mean_abs"] <= equality["tolerance"]["mean_abs"]
    assert equality["max_p99_abs"] <= equality["tolerance"]["p99_abs"]
    predict = decode["predict"]
    assert predict["image_size"] == "x".join(map(str, dry_run["plan"]["large_size"]))
    for key in ("bare_forward_images_per_s", "pil_images_per_s", "cuda_images_per_s"):
        assert predict[key] > 0
    assert predict["ratio_pil"] == pytest.approx(
        predict["pil_images_per_s"] / predict["bare_forward_images_per_s"], rel=0.02
    )
    assert predict["goal"] == 0.85


def test_ddp_and_bf16_sections(dry_run):
    ddp = dry_run["ddp"]
    assert ddp["ok"] is True and ddp["world_size"] == 1 and ddp["backend"] == "gloo"
    assert ddp["record"]["gradients_match"] and ddp["record"]["weights_match"]
    bf16 = dry_run["bf16"]
    assert bf16["trained"] is True and bf16["images"] == dry_run["plan"]["eval_images"]
    assert 0.0 <= bf16["agreement"] <= 1.0
    assert bf16["disagreements"] == round((1 - bf16["agreement"]) * bf16["images"])
    assert 0.0 <= bf16["max_abs_p_change"] < 0.5


def test_without_cuda_the_full_run_refuses_with_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the full run would start")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu.json")], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 2 and "--dry-run" in done.stderr
    assert not (tmp_path / "gpu.json").exists()
