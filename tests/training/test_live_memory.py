"""train --mode train with an adapter: peak memory does not grow with the number of training images.

The optimiser batch (``train.batch_size``, 256 by default) is the whole training set of a small run, and an adapted
backbone's training forward keeps every layer's activations of every image of it for backward (about 120 MB per
224-pixel image for efficientnet_lite0 with DoRA). The live loop runs the backbone in checkpointed chunks instead,
so only one chunk's activations are alive at a time.

Each size runs in its own process, whose own peak resident set size (``ru_maxrss``) is the measurement: 16 and 48
training images at 112 pixels with LoRA. Without the chunks, the 32 extra images add about 23 MB each (about
740 MB); with them the two peaks differ by the inputs' few MB and the allocator's noise. The margin, 200 MB, sits
well between the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

MARGIN_MB = 200

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from roadwork_cli.config import load_settings
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.training.api import train

    run = RunDir(sys.argv[1])
    overrides = {
        "runtime": {"run": str(run.root), "device": "cpu", "threads": 1},
        "model": {"backbone": "efficientnet_lite0", "image_size": 112, "peft": {"method": "lora", "rank": 4}},
        "features": {"workers": 0, "batch_size": 8},
        "data": {"augment": "none"},
        "train": {"mode": "train", "epochs": 1, "ema_decay": 0.0, "warm_start": False},
    }
    train(run, load_settings(None, overrides, environ={}))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    """
)


def _run_with(root: Path, n_train: int) -> Path:
    """A run whose splits.json lists ``n_train`` training images (and two of each other split)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    splits: dict[str, list[str]] = {}
    samples = {}
    k = 0
    for split, count in {"train": n_train, "val_select": 2, "val_calib": 2, "test": 2}.items():
        splits[split] = []
        for _ in range(count):
            label = k % 2
            pixels = rng.integers(0, 90, (48, 48, 3)).astype(np.uint8)
            pixels[..., 0 if label else 2] += 120
            path = root / f"{k}.png"
            Image.fromarray(pixels).save(path)
            image_id = f"{k:064x}"
            splits[split].append(image_id)
            samples[image_id] = {"path": str(path), "label": label, "source": "test", "group": image_id}
            k += 1
    (root / "splits.json").write_text(json.dumps({"version": 1, "seed": 0, "splits": splits, "samples": samples}))
    return root


def _peak_rss_mb(root: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1]) / 1024


@pytest.mark.slow
def test_peak_memory_of_an_adapted_live_run_does_not_grow_with_the_training_set(tmp_path):
    small = _peak_rss_mb(_run_with(tmp_path / "small", 16))
    large = _peak_rss_mb(_run_with(tmp_path / "large", 48))
    assert large - small < MARGIN_MB, f"peak RSS {small:.0f} MB with 16 training images, {large:.0f} MB with 48"
