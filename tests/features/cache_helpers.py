"""Helpers: a run with a hand-written splits.json (format of docs/architecture.md) over small PNG files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from split_helpers import write_splits

from roadwork_cli.config import load_settings
from roadwork_cli.io.run import RunDir


def make_run(root: Path, counts=(8, 3, 3, 3), bad: int = 0, seed: int = 0) -> RunDir:
    """Write ``sum(counts)`` random PNGs (+ ``bad`` unreadable files in train) and their splits.json."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    samples: dict[str, dict] = {}
    k = 0
    for name, count in zip(("train", "val_select", "val_calib", "test"), counts, strict=True):
        splits[name] = []
        for i in range(count + (bad if name == "train" else 0)):
            path = images / f"{k:04d}.png"
            label = k % 2
            if name == "train" and i >= count:
                path.write_bytes(b"not an image " + bytes([k]))  # an unusable input
            else:
                pixels = rng.integers(0, 256, size=(48 + 8 * (k % 3), 64, 3), dtype=np.uint8)
                pixels[..., 0] = pixels[..., 0] // 2 + 120 * label  # some class signal
                Image.fromarray(pixels).save(path)
            image_id = hashlib.sha256(path.read_bytes()).hexdigest()
            splits[name].append(image_id)
            samples[image_id] = {"path": str(path), "label": label, "source": str(images), "group": image_id}
            k += 1
    run = RunDir(root / "run").ensure()
    write_splits(run, splits, samples, seed)
    return run


def tiny_settings(run: RunDir, **features):
    overrides = {
        "runtime": {"run": str(run.root), "device": "cpu"},
        "model": {"backbone": "tiny_vit"},
        "features": {"workers": 0, "batch_size": 4, "shard_size": 8, **features},
    }
    return load_settings(None, overrides, environ={})
