"""Is bf16 worth being the CPU default? Forward speed and the change in certified decisions (fp32 vs bf16 autocast).

The verdict rule: bf16 becomes the CPU default (``runtime.precision: auto``) only if it is faster than fp32 AND leaves
every certified decision on the test split unchanged.

1. speed: the bare backbone forward at the best fp32 layout (see ``bench_forward.py``), fp32 vs bf16 autocast,
   measured alternately so that a drifting machine load hits both alike;
2. decisions: a demo-like run (``synthetic:2N`` scenes, the demo's stages and defaults) is split, cached, trained and
   calibrated in fp32. Its test split is then scored twice through the deployed path (``Stage1Model.predict``: decode,
   forward, head, calibrated rule) with the SAME head and calibration, once in fp32 and once with bf16 features, and
   the decisions (roadwork / no_roadwork / defer) are compared one by one, with coverage, FNR on exits and accuracy
   on exits for both.

Usage:
    python benchmarks/bench_precision.py [--per-class 500] [--work DIR] [--out runs/bench/precision.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import images_per_second, machine_details, print_results  # noqa: E402

# Targets a small run can certify: with 500 scenes per class, val_calib holds ~150 positives, enough for FNR <= 10 %
# at 80 % coverage but not for the full demo's 2 % (that needs ~260 exited positives even with no miss).
SMALL_RUN_OVERRIDES = {
    "calibration": {"fnr": 0.1, "coverage": 0.8, "delta": 0.1, "allow_infeasible": True},
    "runtime": {"precision": "fp32", "device": "cpu"},
}


def build_run(work: Path, per_class: int, progress: bool = False) -> tuple[object, object, dict]:
    """Split, cache (fp32), train and calibrate a demo-like run in ``work`` (re-used when already there)."""
    from roadwork_cli.calibration.api import calibrate_run
    from roadwork_cli.data.splits import build_splits
    from roadwork_cli.features.cache import cache_features
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.pipeline import demo_settings
    from roadwork_cli.training.api import train

    work.mkdir(parents=True, exist_ok=True)
    overrides = work / "overrides.yaml"
    overrides.write_text(yaml.safe_dump(SMALL_RUN_OVERRIDES))
    settings = demo_settings(overrides, per_class=per_class, run=work / "run", environ={})
    run = RunDir(settings.runtime.run).ensure()
    seconds = {}
    for name, stage in (
        ("split", lambda: build_splits(settings.data.sources, settings.data, run, progress=progress)),
        ("cache-features", lambda: cache_features(run, settings, progress=progress)),
        ("train", lambda: train(run, settings, progress=progress)),
    ):
        started = time.perf_counter()
        stage()
        seconds[name] = round(time.perf_counter() - started, 1)
    calibration = calibrate_run(run, settings.calibration)
    return run, settings, {"stage_seconds": seconds, "certified": calibration.feasible}


def selective_metrics(labels: np.ndarray, decisions: list[str]) -> dict:
    """Coverage, FNR on exits and accuracy on exits of roadwork / no_roadwork / defer decisions."""
    from roadwork_cli.metrics.selective import accuracy_on_exits, coverage, fnr_on_exits

    exits = np.array([d != "defer" for d in decisions])
    predicted = np.array([d == "roadwork" for d in decisions], dtype=int)
    return {
        "coverage": round(coverage(exits), 4),
        "fnr_on_exits": round(fnr_on_exits(labels, predicted, exits), 4),
        "accuracy_on_exits": round(accuracy_on_exits(labels, predicted, exits), 4),
    }


def compare_decisions(run, settings) -> dict:
    """Score the test split with fp32 and with bf16 features (same head and calibration); count what changes."""
    from roadwork_cli.data.splits import Splits
    from roadwork_cli.stage1 import Stage1Model

    splits = Splits.load(run.splits)
    test = [splits.samples[i] for i in splits.ids("test")]
    labels = np.array([s.label for s in test])
    results = {}
    for precision in ("fp32", "bf16"):
        model = Stage1Model.from_run(run, device="cpu", precision=precision)
        predictions = model.predict([s.path for s in test], batch_size=settings.predict.batch_size)
        results[precision] = predictions
    fp32, bf16 = results["fp32"], results["bf16"]
    assert all(p.error is None for p in fp32 + bf16), "a synthetic test image failed to decode"
    changes: dict[str, int] = {}
    for a, b in zip(fp32, bf16, strict=True):
        if a.decision != b.decision:
            key = f"{a.decision}->{b.decision}"
            changes[key] = changes.get(key, 0) + 1
    p_diff = np.abs(np.array([a.p_roadwork for a in fp32]) - np.array([b.p_roadwork for b in bf16]))
    return {
        "test_images": len(test),
        "test_positives": int(labels.sum()),
        "decisions_changed": sum(changes.values()),
        "changes": changes,
        "max_abs_p_roadwork_diff": float(p_diff.max()),
        "mean_abs_p_roadwork_diff": float(p_diff.mean()),
        "fp32": selective_metrics(labels, [p.decision for p in fp32]),
        "bf16": selective_metrics(labels, [p.decision for p in bf16]),
    }


def compare_speed(backbone_name: str, batch_size: int, channels_last: bool, rounds: int, seconds: float) -> dict:
    """Median images/s of the bare forward in fp32 and bf16 autocast, alternating over ``rounds``."""
    from roadwork_cli.model.backbones import create_backbone

    backbone = create_backbone(backbone_name).eval()
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            rates[name].append(images_per_second(backbone, batch_size, channels_last, dtype, seconds))
    fp32, bf16 = float(np.median(rates["fp32"])), float(np.median(rates["bf16"]))
    return {
        "backbone": backbone_name,
        "batch_size": batch_size,
        "channels_last": channels_last,
        "fp32_img_s": round(fp32, 1),
        "bf16_img_s": round(bf16, 1),
        "speedup_bf16": round(bf16 / fp32, 3),
        "per_round": {name: [round(r, 1) for r in values] for name, values in rates.items()},
    }


def verdict(speed: dict, decisions: dict, certified: bool) -> dict:
    """The rule for the CPU default: bf16 only if it is faster AND no certified decision changes."""
    faster = speed["speedup_bf16"] > 1.0
    unchanged = decisions["decisions_changed"] == 0
    default = faster and unchanged and certified
    reasons = [
        f"bf16 forward {speed['speedup_bf16']:.2f}x fp32 ({'faster' if faster else 'not faster'})",
        f"{decisions['decisions_changed']} of {decisions['test_images']} test decisions change",
    ]
    if not certified:
        reasons.append("the run did not certify its targets, so no decision here is a certified one")
    return {"bf16_cpu_default": default, "faster": faster, "decisions_unchanged": unchanged, "why": "; ".join(reasons)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=500, help="Synthetic scenes per class of the small run.")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/precision"), help="Where the run is kept.")
    parser.add_argument("--batch-size", type=int, default=64, help="Bare-forward batch (best layout of bench_forward).")
    parser.add_argument("--contiguous", action="store_true", help="Contiguous instead of channels-last layout.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="Measuring time per speed row.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the results JSON here.")
    args = parser.parse_args(argv)

    machine = machine_details()
    speed = compare_speed("efficientnet_lite0", args.batch_size, not args.contiguous, args.rounds, args.seconds)
    run, settings, built = build_run(args.work, args.per_class)
    decisions = compare_decisions(run, settings)
    results = {
        "machine": machine,
        "speed": speed,
        "run": {"per_class": args.per_class, "calibration": SMALL_RUN_OVERRIDES["calibration"], **built},
        "decisions": decisions,
        "verdict": verdict(speed, decisions, built["certified"]),
    }
    return print_results(results, args.out)


if __name__ == "__main__":
    main()
