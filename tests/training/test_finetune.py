"""train --mode train: adapters and optimisers learn on live images, resume after SIGKILL, warm start, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from split_helpers import splits_table, write_splits

from roadwork_cli.config import load_settings
from roadwork_cli.errors import UsageError
from roadwork_cli.features.cache import read_split_table
from roadwork_cli.io.atomic import read_json
from roadwork_cli.io.run import RunDir
from roadwork_cli.training import finetune
from roadwork_cli.training.api import train
from roadwork_cli.training.artifacts import SCORE_COLUMNS
from roadwork_cli.training.live_step import LiveImages, LiveModel
from roadwork_cli.training.losses import selective_loss

COUNTS = {"train": 24, "val_select": 8, "val_calib": 6, "test": 6}


@pytest.fixture(scope="module")
def image_table(tmp_path_factory) -> dict:
    """Small noisy images whose dominant colour (red / blue) is the label; one training file is corrupt."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    splits, samples, k = {}, {}, 0
    for split, count in COUNTS.items():
        splits[split] = []
        for _ in range(count):
            label = k % 2
            pixels = rng.integers(0, 90, (40, 40, 3)).astype(np.uint8)
            pixels[..., 0 if label else 2] += 120
            path = folder / f"{k}.png"
            Image.fromarray(pixels).save(path)
            image_id = f"{k:064x}"
            splits[split].append(image_id)
            samples[image_id] = {"path": str(path), "label": label, "source": "test", "group": image_id}
            k += 1
    (folder / "3.png").write_bytes(b"not an image at all")  # a training image: skipped with its reason
    return splits_table(splits, samples)


def make_run(root: Path, table: dict) -> RunDir:
    run = RunDir(root).ensure()
    write_splits(run, table["splits"], table["samples"], table["seed"])
    return run


def live_settings(run: RunDir, method: str = "dora", **train):
    overrides = {
        "runtime": {"run": str(run.root), "device": "cpu", "threads": 1},
        "model": {
            "backbone": "tiny_vit",
            "head_hidden": 16,
            "head_dropout": 0.0,
            "peft": {"method": method, "rank": 4},
        },
        "features": {"workers": 0, "batch_size": 16},
        "data": {"augment": "none"},
        "train": {"mode": "train", "epochs": 3, "batch_size": 8, "lr": 1e-2, "ema_decay": 0.0, **train},
    }
    return load_settings(None, overrides, environ={})


def training_loss(run: RunDir, settings, model: LiveModel | None = None) -> float:
    """The objective on the clean training images: of ``model``, or of the freshly initialised one."""
    images = LiveImages(read_split_table(run), {})
    setup = finetune._setup(settings, torch.device("cpu"), len(images.ids("train")), None)
    _, labels, output = finetune._score(setup, model or setup.model, images, images.ids("train"))
    return float(selective_loss(output, labels, settings.train.loss, settings.train.target_coverage)[0])


@pytest.mark.parametrize(
    ("method", "optimizer"),
    [("lora", "adamw"), ("dora", "adamw"), ("doran", "adamw"), ("none", "adamw"), ("dora", "sam"), ("dora", "fsam")],
)
def test_a_few_steps_lower_the_training_loss(tmp_path, image_table, method, optimizer):
    run = make_run(tmp_path / "run", image_table)
    settings = live_settings(run, method, optimizer=optimizer)
    before = training_loss(run, settings)
    summary = train(run, settings)
    images = LiveImages(read_split_table(run), {})
    setup = finetune._setup(settings, torch.device("cpu"), len(images.ids("train")), None)
    after = training_loss(run, settings, finetune._best_model(run, setup)[0])
    assert after < 0.9 * before, (before, after)

    assert summary.mode == "train" and summary.n_failed == 1 and "could not be read" in summary.notes[-1]
    info = read_json(run.checkpoints / "best.json")
    assert info["mode"] == "train" and info["recipe"]["compute_precision"] == "fp32"
    if method == "none":  # head only: the plain backbone, nothing merged
        assert "adapters" not in info and not run.best_backbone.exists()
        assert info["fingerprint"] == setup.base_fingerprint
    else:
        assert info["adapters"]["method"] == method and info["adapters"]["base_fingerprint"] == setup.base_fingerprint
        assert info["fingerprint"] == info["adapters"]["merged_fingerprint"] != setup.base_fingerprint
        assert info["backbone"]["spec"]["weights"] == "checkpoints/best_backbone.safetensors"
    for split in ("val_select", "val_calib", "test"):
        lines = (run.scores / f"{split}.csv").read_text().splitlines()
        assert lines[0] == ",".join(SCORE_COLUMNS) and len(lines) == COUNTS[split] + 1
    assert len((run.metrics).read_text().splitlines()) == 1 + settings.train.epochs

    # The model that calibrate / export build follows the recipe the scores were computed with, not a feature
    # cache's (here a made-up bf16 one without draft decoding).
    from roadwork_cli.stage1 import Stage1Model

    (run.features / "cache").mkdir(parents=True)
    (run.features / "current.json").write_text(json.dumps({"fingerprint": "cache"}))
    recipe = {"compute_precision": "bf16", "decode": {"jpeg_draft": False}}
    (run.features / "cache" / "meta.json").write_text(json.dumps({"recipe": recipe}))
    rebuilt = Stage1Model.from_run(run, device="cpu", calibrated=False)
    assert rebuilt.info["recipe"]["compute_precision"] == "fp32" and rebuilt.jpeg_draft is True


def test_sigkill_resume_reproduces_the_uninterrupted_weights(tmp_path, image_table):
    """Augmented views, F-SAM, accumulation, clipping and dropout: all of it repeats after a real SIGKILL."""
    extra = {"optimizer": "fsam", "accumulate": 2, "grad_clip": 1.0, "ema_decay": 0.9}
    clean, killed = make_run(tmp_path / "clean", image_table), make_run(tmp_path / "killed", image_table)

    def settings_of(run):
        settings = live_settings(run, "doran", **extra)
        settings.data.augment = "moderate"
        settings.model.peft.dropout = 0.1
        settings.model.head_dropout = 0.1
        return settings

    train(clean, settings_of(clean))
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]  # + split_helpers
        from pathlib import Path
        from test_finetune import live_settings
        from roadwork_cli.io.run import RunDir
        from roadwork_cli.training.api import train

        run = RunDir(Path({str(killed.root)!r}))
        settings = live_settings(run, "doran", **{extra!r})
        settings.data.augment = "moderate"
        settings.model.peft.dropout = 0.1
        settings.model.head_dropout = 0.1

        def kill(epoch, metrics):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        train(run, settings, on_epoch_end=kill)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert torch.load(killed.checkpoints / "last.pt", weights_only=True)["epoch"] == 2
    summary = train(killed, settings_of(killed))
    assert summary.resumed_from == 2 and summary.epochs_run == 1

    for name in ("best.safetensors", "best_backbone.safetensors"):
        a, b = load_file(str(clean.checkpoints / name)), load_file(str(killed.checkpoints / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(clean.checkpoints / "last.pt", weights_only=True)
    b = torch.load(killed.checkpoints / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert (clean.scores / "test.csv").read_text() == (killed.scores / "test.csv").read_text()


def test_warm_start_from_a_train_cached_head_on_the_same_backbone(tmp_path, image_table):
    from safetensors.torch import save_file

    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import create_head

    run = make_run(tmp_path / "run", image_table)
    run.checkpoints.mkdir(parents=True)
    settings = live_settings(run, "lora", epochs=1)
    backbone = create_backbone("tiny_vit")
    torch.manual_seed(123)
    head = create_head(settings.model, backbone.feature_dim)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(run.checkpoints / "best.safetensors"))
    cached_info = {"head": head.config, "backbone": backbone.spec, "fingerprint": f"{backbone.fingerprint}-bf16"}
    cached_info |= {"epoch": 1, "select_metric": "mcc", "metric": None, "val_select": {}, "ema": False}
    (run.checkpoints / "best.json").write_text(json.dumps(cached_info))
    cached_bytes = (run.checkpoints / "best.safetensors").read_bytes()

    kept = finetune._warm_start(run, settings, backbone.fingerprint, backbone.feature_dim)
    assert kept is not None and kept.read_bytes() == cached_bytes
    setup = finetune._setup(settings, torch.device("cpu"), COUNTS["train"], kept)
    assert all(torch.equal(v, setup.model.head.state_dict()[k]) for k, v in head.state_dict().items())
    train(run, settings)
    assert read_json(run.checkpoints / "best.json")["warm_start"] is True
    # best.* now holds the fine-tuned head (mode train); the kept copy still seeds a resumed or repeated start.
    assert finetune._warm_start(run, settings, backbone.fingerprint, backbone.feature_dim).read_bytes() == cached_bytes

    settings.train.warm_start = False
    assert finetune._warm_start(run, settings, backbone.fingerprint, backbone.feature_dim) is None
    other = make_run(tmp_path / "other", image_table)
    other.checkpoints.mkdir(parents=True)
    (other.checkpoints / "best.safetensors").write_bytes(cached_bytes)
    (other.checkpoints / "best.json").write_text(json.dumps(dict(cached_info, fingerprint="0123456789abcdef")))
    assert finetune._warm_start(other, live_settings(other), backbone.fingerprint, backbone.feature_dim) is None
    # A head of another gate kind has other weights (gate_out): no warm start rather than a failed load.
    third = make_run(tmp_path / "third", image_table)
    third.checkpoints.mkdir(parents=True)
    (third.checkpoints / "best.safetensors").write_bytes(cached_bytes)
    (third.checkpoints / "best.json").write_text(json.dumps(dict(cached_info, head=dict(head.config, gate="crossfit"))))
    assert finetune._warm_start(third, live_settings(third), backbone.fingerprint, backbone.feature_dim) is None
    # A head refit on train + val_select saw the images whose scores the live loop writes for calibration: no start.
    fourth = make_run(tmp_path / "fourth", image_table)
    fourth.checkpoints.mkdir(parents=True)
    (fourth.checkpoints / "best.safetensors").write_bytes(cached_bytes)
    (fourth.checkpoints / "best.json").write_text(json.dumps(dict(cached_info, refit=True)))
    assert finetune._warm_start(fourth, live_settings(fourth), backbone.fingerprint, backbone.feature_dim) is None


def test_fp16_with_sharpness_aware_optimisers_is_a_settings_error(tmp_path, image_table):
    run = make_run(tmp_path / "run", image_table)
    settings = live_settings(run, "lora", optimizer="fsam")
    settings.runtime.precision = "fp16"
    with pytest.raises(UsageError, match="bf16"):
        train(run, settings)


def test_efficientnet_pointwise_convs_adapt_while_batchnorm_statistics_stay_frozen(tmp_path, image_table, monkeypatch):
    """The default efficientnet targets are its 1x1 convolutions; no BatchNorm running statistic moves in training."""
    from roadwork_cli.model.backbones import create_backbone

    created = {}

    def tiny_efficientnet(settings):
        torch.manual_seed(0)
        backbone = create_backbone("timm:tf_efficientnet_lite0", pretrained=False, image_size=32)
        created["state"] = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        return backbone

    monkeypatch.setattr(finetune, "_create_backbone", tiny_efficientnet)
    run = make_run(tmp_path / "run", image_table)
    train(run, live_settings(run, "dora", epochs=1, lr=0.05))
    info = read_json(run.checkpoints / "best.json")
    targets = info["adapters"]["target_modules"]
    assert targets and all(name.rsplit(".", 1)[-1] in ("conv_pw", "conv_pwl", "conv_head") for name in targets)
    merged, base = load_file(str(run.best_backbone)), created["state"]
    assert merged.keys() == base.keys()
    stats = [k for k in base if "running_" in k]
    assert stats and all(torch.equal(merged[k], base[k]) for k in stats)
    adapted = {f"{name}.weight" for name in targets}
    assert any(not torch.equal(merged[k], base[k]) for k in adapted)  # the merged adapters changed them
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in adapted)  # and nothing else


def test_train_takes_the_runs_backbone_and_refuses_a_conflicting_one(tmp_path, image_table):
    """cache-features --backbone tiny_vit, a train_cached head, then `train --mode train` without naming a backbone:
    the run's tiny_vit is fine-tuned (not the settings' default), config.yaml says so, and an explicit other backbone
    is refused with the command that switches the run."""
    import yaml

    from roadwork_cli.features.cache import cache_features

    run = make_run(tmp_path / "run", image_table)
    cached = live_settings(run, "none", mode="train_cached", epochs=1)
    cache_features(run, cached)
    train(run, cached)

    def later(**model):  # a later command's settings: no backbone unless given
        overrides = {
            "runtime": {"run": str(run.root), "device": "cpu", "threads": 1},
            "model": {"head_hidden": 16, "head_dropout": 0.0, "peft": {"method": "lora", "rank": 4}, **model},
            "features": {"workers": 0, "batch_size": 16},
            "data": {"augment": "none"},
            "train": {"mode": "train", "epochs": 1, "batch_size": 8, "ema_decay": 0.0},
        }
        return load_settings(None, overrides, environ={})

    assert later().model.backbone == "efficientnet_lite0"  # what the bug fine-tuned
    summary = train(run, later())
    assert summary.backbone == "tiny_vit"
    record = read_json(run.best_record)
    assert record["backbone"]["spec"]["name"] == "tiny_vit" and record["warm_start"] is True
    assert yaml.safe_load(run.config.read_text())["model"]["backbone"] == "tiny_vit"

    with pytest.raises(UsageError, match=r"cache-features --run .* --backbone efficientnet_lite0"):
        train(run, later(backbone="efficientnet_lite0"))
    assert train(run, later(backbone="tiny_vit")).backbone == "tiny_vit"  # the run's own, named: fine


def test_a_run_without_features_takes_its_backbone_from_the_best_record(tmp_path, image_table):
    """A run trained with --mode train only has no features: its best record names the backbone (not its weights,
    which are the fine-tuned ones)."""
    from roadwork_cli.features.current import with_run_backbone
    from roadwork_cli.io.records import BestRecord, write_best_record

    run = make_run(tmp_path / "run", image_table)
    spec = {"name": "tiny_vit", "image_size": 32, "weights": "checkpoints/best_backbone.safetensors"}
    record = BestRecord(
        head={}, backbone={"spec": spec, "fingerprint": "f"}, fingerprint="f", epoch=1, select_metric="mcc",
        metric=None, val_select={}, ema=False, mode="train", adapters={"method": "lora"},
    )  # fmt: skip
    run.checkpoints.mkdir()
    write_best_record(run, record)
    defaults = load_settings(None, {"runtime": {"run": str(run.root)}}, environ={})
    settings = with_run_backbone(run, defaults, "`train`")
    assert (settings.model.backbone, settings.model.image_size, settings.model.weights) == ("tiny_vit", 32, None)
    explicit = load_settings(None, {"model": {"backbone": "efficientnet_lite0"}}, environ={})
    with pytest.raises(UsageError, match="cache-features"):
        with_run_backbone(run, explicit, "`train`")
