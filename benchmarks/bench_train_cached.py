"""Benchmark: ``train --mode train_cached`` on 10 000 random cached samples (D = 1280) x 30 epochs.

The features are written as a real feature cache (safetensors shards + index) with a weak class signal, plus
1 000 samples each for val_select, val_calib and test, so the timed call is exactly what ``roadwork train`` runs:
loading the cache, 30 epochs of training with EMA and per-epoch selection on val_select, checkpoints, metrics.csv
and the three score files. Goal: < 20 s on 2 CPU cores.

Usage:
    .venv/bin/python benchmarks/bench_train_cached.py [--train 10000] [--epochs 30] [--dim 1280] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_data import write_splits

from roadwork_cli.config import load_settings
from roadwork_cli.features.cache import write_feature_cache
from roadwork_cli.io.records import CurrentFeatures, write_current
from roadwork_cli.io.run import RunDir
from roadwork_cli.training.api import train


def write_random_cache(root: Path, n_train: int, n_eval: int, dim: int, seed: int = 0) -> RunDir:
    """A run whose splits.json and feature cache hold random features: x = noise + 0.5 * label * direction."""
    generator = torch.Generator().manual_seed(seed)
    counts = {"train": n_train, "val_select": n_eval, "val_calib": n_eval, "test": n_eval}
    total = sum(counts.values())
    labels = torch.randint(0, 2, (total,), generator=generator)
    direction = torch.randn(dim, generator=generator) / dim**0.5
    features = torch.randn(total, dim, generator=generator) + 3.0 * labels[:, None] * direction
    ids = [f"{i:064x}" for i in range(total)]
    splits, start = {}, 0
    for name, count in counts.items():
        splits[name] = ids[start : start + count]
        start += count
    samples = {
        i: {"path": f"/nonexistent/{i}.jpg", "label": int(y), "source": "bench", "group": i}
        for i, y in zip(ids, labels.tolist(), strict=True)
    }
    run = RunDir(root / "run").ensure()
    write_splits(run.splits, splits, samples, seed)
    fingerprint = "bench0000000000"
    meta = {"fingerprint": fingerprint, "backbone": {"name": "efficientnet_lite0"}, "feature_dim": dim, "views": 0}
    write_feature_cache(run.features / fingerprint, meta, [(i, 0) for i in ids], features, shard_size=4096)
    write_current(run, CurrentFeatures(fingerprint=fingerprint, backbone="efficientnet_lite0"))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--eval", type=int, default=1_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the trainer's choice)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = write_random_cache(Path(tmp), args.train, args.eval, args.dim)
        settings = load_settings(
            None,
            {
                "runtime": {"run": str(run.root), "device": "cpu", "threads": args.threads},
                "train": {"epochs": args.epochs},
            },
            environ={},
        )
        started = time.perf_counter()
        summary = train(run, settings)
        seconds = time.perf_counter() - started
    print(
        f"train_cached: {args.train} samples x {args.epochs} epochs, D={args.dim}, batch {settings.train.batch_size}, "
        f"threads {args.threads or 'default (1 on CPU)'}"
    )
    print(
        f"best epoch {summary.best_epoch}: val_select mcc {summary.best_metrics['mcc']:.3f}, "
        f"auroc {summary.best_metrics['auroc']:.3f}"
    )
    print(f"seconds           {seconds:8.2f}   (goal < 20 s on 2 cores)")
    print(f"epochs/s          {args.epochs / seconds:8.2f}")


if __name__ == "__main__":
    main()
