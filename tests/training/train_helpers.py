"""A run with a hand-written splits.json and a feature cache of random, linearly separable features."""

from __future__ import annotations

from pathlib import Path

import torch
from split_helpers import write_splits

from roadwork_cli.config import load_settings
from roadwork_cli.features.cache import write_feature_cache
from roadwork_cli.io.records import CurrentFeatures, write_current
from roadwork_cli.io.run import RunDir

DIM = 16


def make_cached_run(root: Path, counts=(160, 60, 60, 60), views: int = 1, seed: int = 0, signal: float = 2.5):
    generator = torch.Generator().manual_seed(seed)
    names = ("train", "val_select", "val_calib", "test")
    total = sum(counts)
    labels = torch.randint(0, 2, (total,), generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(DIM, generator=generator), dim=0)
    base = torch.randn(total, DIM, generator=generator) + signal * (2 * labels[:, None] - 1) * direction
    ids = [f"{seed:02d}{i:062x}" for i in range(total)]
    splits, start = {}, 0
    for name, count in zip(names, counts, strict=True):
        splits[name] = ids[start : start + count]
        start += count
    samples = {
        i: {"path": f"/nowhere/{i}.png", "label": int(y), "source": "test", "group": i}
        for i, y in zip(ids, labels.tolist(), strict=True)
    }
    run = RunDir(root).ensure()
    write_splits(run, splits, samples, seed)
    keys = [(i, 0) for i in ids]
    rows = [base]
    for view in range(1, views + 1):
        keys += [(i, view) for i in splits["train"]]
        rows.append(base[: counts[0]] + 0.3 * torch.randn(counts[0], DIM, generator=generator))
    fingerprint = "testfingerprint0"
    meta = {"fingerprint": fingerprint, "backbone": {"name": "tiny_vit"}, "feature_dim": DIM, "views": views}
    write_feature_cache(run.features / fingerprint, meta, keys, torch.cat(rows), shard_size=128)
    write_current(run, CurrentFeatures(fingerprint=fingerprint, backbone="tiny_vit"))
    return run


def train_settings(run: RunDir, **train):
    overrides = {
        "runtime": {"run": str(run.root), "device": "cpu"},
        "model": {"backbone": "tiny_vit", "head_hidden": 16},
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, **train},
    }
    return load_settings(None, overrides, environ={})
