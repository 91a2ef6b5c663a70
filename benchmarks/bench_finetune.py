"""Benchmark: ``train`` (DoRA on efficientnet_lite0's pointwise convs) against ``train_cached`` on the same splits.

Both runs use the demo's synthetic scenes, its calibration settings (FNR <= 2 % among exits, coverage >= 80 %,
delta 0.1, band rule) and the same ``splits.json``:

1. ``cached``: split -> cache-features -> train_cached -> calibrate -> evaluate (test).
2. ``live``: the same splits and the finished train_cached head (warm start) -> ``train --mode train`` with DoRA
   adapters on the 1x1 convolutions -> calibrate -> evaluate (test).

Printed and written to ``<root>/results.json``: accuracy, MCC, AUROC, AURC, coverage and accuracy on exits at the
certified operating point on test, whether the guarantee certified, and seconds per training epoch. A full demo-size
run (2 x 2500 images, 30 epochs) of live fine-tuning takes hours on a laptop CPU; use ``--per-class`` and
``--epochs`` for a subset (the figures say which was used).

Usage:
    .venv/bin/python benchmarks/bench_finetune.py [--per-class 1000] [--fractions 0.2,0.1,0.4,0.3] [--epochs 3]
        [--rank 8] [--image-size 224] [--threads 2] [--root runs/bench/finetune]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from roadwork_cli.config import deep_merge, load_settings
from roadwork_cli.io.run import RunDir
from roadwork_cli.pipeline import demo_settings

REPORT_KEYS = ("accuracy", "mcc", "auroc", "aurc", "coverage", "accuracy_on_exits", "fnr_on_exits")


def _settings(base: Any, run: Path, overrides: dict[str, Any]) -> Any:
    layered = deep_merge(base.model_dump(mode="json"), overrides)
    layered["runtime"]["run"] = str(run)
    return load_settings(None, layered, environ={})


def _seconds_per_epoch(epoch_ends: list[float]) -> float | None:
    """Mean time between consecutive epoch ends: one epoch's training and val_select scoring, the same way for both
    modes (set-up, the first epoch's warm-up and the final scoring of every split left out); None under 2 epochs run."""
    steps = [b - a for a, b in zip(epoch_ends, epoch_ends[1:], strict=False)]
    return sum(steps) / len(steps) if steps else None


def _calibrate_and_evaluate(run: RunDir, settings: Any) -> dict[str, Any]:
    from roadwork_cli.calibration.api import calibrate_run
    from roadwork_cli.reporting.evaluate import evaluate_run

    calibrate_run(run, settings.calibration)
    report = evaluate_run(run, settings, split="test")
    report = report if isinstance(report, dict) else json.loads((run.root / "eval" / "report.json").read_text())
    out = {key: report.get(key) for key in REPORT_KEYS}
    guarantee = report.get("guarantee") or {}
    out["certified"], out["satisfied"] = bool(guarantee.get("certified")), bool(guarantee.get("satisfied"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--fractions", default="0.2,0.1,0.4,0.3", help="train,val_select,val_calib,test")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the live run (train_cached keeps 30)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=None, help="input side of both runs (default: 224)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("runs/bench/finetune"))
    args = parser.parse_args()

    from roadwork_cli.data.splits import build_splits
    from roadwork_cli.features.cache import cache_features
    from roadwork_cli.training.api import train

    fractions = [float(f) for f in args.fractions.split(",")]
    base = demo_settings(None, per_class=args.per_class, run=args.root / "cached", device="cpu", threads=args.threads)
    # An uncertified calibration is reported as such (certified: false) rather than stopping the comparison.
    common = {
        "data": {"fractions": fractions},
        "features": {"workers": args.workers},
        "calibration": {"allow_infeasible": True},
        "model": {"image_size": args.image_size},
        "runtime": {},
    }
    cached_settings = _settings(base, args.root / "cached", deep_merge(common, {"train": {"mode": "train_cached"}}))
    cached = RunDir(args.root / "cached").ensure()
    results: dict[str, Any] = {
        "per_class": args.per_class,
        "fractions": fractions,
        "image_size": args.image_size,
        "threads": args.threads,
    }

    started = time.perf_counter()
    if not cached.splits.exists():
        build_splits(cached_settings.data.sources, cached_settings.data, cached)
    results["split_s"] = time.perf_counter() - started
    started = time.perf_counter()
    cache_features(cached, cached_settings, progress=True)
    results["cache_features_s"] = time.perf_counter() - started
    cached_ends: list[float] = []
    summary = train(
        cached, cached_settings, progress=True, on_epoch_end=lambda e, m: cached_ends.append(time.perf_counter())
    )
    results["train_cached"] = {
        "epochs": cached_settings.train.epochs,
        "n_train": summary.n_train,
        "seconds_per_epoch": _seconds_per_epoch(cached_ends),
        "seconds_per_epoch_with_cache": (summary.seconds + results["cache_features_s"]) / cached_settings.train.epochs,
        **_calibrate_and_evaluate(cached, cached_settings),
    }

    live = RunDir(args.root / "live").ensure()
    shutil.copy2(cached.splits, live.splits)
    live.checkpoints.mkdir(parents=True, exist_ok=True)
    for name in ("best.safetensors", "best.json"):  # the finished train_cached head: the warm start
        if not (live.checkpoints / "last.pt").exists():
            shutil.copy2(cached.checkpoints / name, live.checkpoints / name)
    live_overrides = {
        "model": {"peft": {"method": "dora", "rank": args.rank, "alpha": 2.0 * args.rank}},
        "train": {
            "mode": "train",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_epochs": 0.5,
            "ema_decay": 0.9,
        },
    }
    live_settings = _settings(base, args.root / "live", deep_merge(common, live_overrides))
    live_ends: list[float] = []
    summary = train(live, live_settings, progress=True, on_epoch_end=lambda e, m: live_ends.append(time.perf_counter()))
    results["train"] = {
        "epochs": args.epochs,
        "n_train": summary.n_train,
        "seconds_per_epoch": _seconds_per_epoch(live_ends),
        "seconds_total": summary.seconds,
        "adapters": f"dora rank {args.rank} on conv_pw/conv_pwl/conv_head",
        **_calibrate_and_evaluate(live, live_settings),
    }
    (args.root / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
