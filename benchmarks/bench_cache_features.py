"""Benchmark: ``cache-features`` end to end vs the bare backbone forward, same process, same backbone.

Writes N synthetic 320x240 JPEGs and a splits.json into a temporary run, measures

* bare: ``backbone(x)`` on in-memory normalised tensors (images/s), the ceiling;
* end to end: :func:`roadwork_cli.features.cache.cache_features` (decode, transform, DataLoader workers, forward,
  fp16 safetensors shards, index) in images/s;

and prints their ratio (goal >= 0.85). The machine may be shared, so absolute numbers drift: each round measures
the bare forward right before and right after one end-to-end pass (into a fresh cache folder) and the ratio is taken
within the round; the median over rounds is reported.

Usage:
    .venv/bin/python benchmarks/bench_cache_features.py [--images 512] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_data import street_scene, write_jpegs, write_splits

from roadwork_cli.config import load_settings
from roadwork_cli.features.cache import cache_features
from roadwork_cli.io.run import RunDir
from roadwork_cli.model.backbones import create_backbone


def write_images(root: Path, count: int, seed: int = 0) -> RunDir:
    """``count`` 320x240 JPEG street-like scenes (gradient sky, road, random boxes) and an all-train splits.json."""
    rng = np.random.default_rng(seed)
    folder = root / "images"
    ids, samples = [], {}
    for k, path in enumerate(write_jpegs(folder, count, lambda _: street_scene(rng))):
        image_id = hashlib.sha256(path.read_bytes()).hexdigest()
        ids.append(image_id)
        samples[image_id] = {"path": str(path), "label": k % 2, "source": str(folder), "group": image_id}
    run = RunDir(root / "run").ensure()
    write_splits(run.splits, {"train": ids, "val_select": [], "val_calib": [], "test": []}, samples, seed)
    return run


def bare_forward(backbone, batch_size: int, batches: int, channels_last: bool = True) -> float:
    """Images/s of the backbone alone on random in-memory tensors (inference mode)."""
    size = backbone.preprocessing.size
    x = torch.randn(batch_size, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        backbone(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            backbone(x)
        seconds = time.perf_counter() - start
    return batch_size * batches / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args()
    channels_last = not args.no_channels_last

    with tempfile.TemporaryDirectory() as tmp:
        run = write_images(Path(tmp), args.images)
        backbone = create_backbone(args.backbone)
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        settings = load_settings(
            None,
            {
                "runtime": {"run": str(run.root), "device": "cpu"},
                "model": {"backbone": args.backbone},
                "features": {
                    "batch_size": args.batch_size,
                    "workers": args.workers,
                    "shard_size": 2048,
                    "channels_last": channels_last,
                },
            },
            environ={},
        )
        batches = max(2, args.images // args.batch_size // 2)
        rows = []
        for _ in range(args.rounds):
            shutil.rmtree(run.features, ignore_errors=True)
            before = bare_forward(backbone, args.batch_size, batches, channels_last)
            summary = cache_features(run, settings, backbone=backbone)
            after = bare_forward(backbone, args.batch_size, batches, channels_last)
            bare = (before + after) / 2
            rows.append((bare, summary.images_per_second, summary.images_per_second / bare))
            print(
                f"round {len(rows)}: bare {bare:7.1f} img/s (before {before:.1f}, after {after:.1f}); "
                f"cache-features {summary.images_per_second:7.1f} img/s ({summary.computed} images, "
                f"{summary.seconds:.1f} s); ratio {rows[-1][2]:.3f}"
            )
    print(f"backbone          {args.backbone} (torch threads {torch.get_num_threads()}, workers {args.workers})")
    print(f"bare forward      {statistics.median(r[0] for r in rows):8.1f} img/s (median)")
    print(f"cache-features    {statistics.median(r[1] for r in rows):8.1f} img/s (median)")
    print(
        f"ratio             {statistics.median(r[2] for r in rows):8.3f}     (median of per-round ratios; goal >= 0.85)"
    )


if __name__ == "__main__":
    main()
