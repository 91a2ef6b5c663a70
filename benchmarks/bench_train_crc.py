"""train_cached vs train_crc (cached), and the gate head vs the softmax response, on demo-like data.

The demo's data is ``synthetic:5000`` split 0.4 / 0.1 / 0.3 / 0.2 (train / val_select / val_calib / test) and cached
with ``efficientnet_lite0``. To keep CPU modest this reuses the feature pool of ``benchmarks/head_vs_probe.py``
(``synthetic:7000``, the same generator and backbone; built there with ``--pool-only`` if missing): per seed, 5000
pool images are drawn and split with the demo's fractions, and the seed is also the training seed. Each variant is
trained with the demo's settings (``pipeline.DEMO_DEFAULTS``) plus its own overrides, calibrated with SCRC-I (the
demo's targets FNR <= 2 %, coverage >= 80 %, delta 0.1; ``--rules`` picks the stage-1 rules, infeasible calibrations
are reported, not raised) and scored on test with the same report code as ``roadwork evaluate``.

Reported per variant and rule, mean +- sd over seeds, on test: AURC of the rule's selection score, AURC of the
calibrated gate head and of the softmax response max(p, 1-p) (risk = error of the exit decision), the selection score
``gate_score: auto`` chose on val_select, accuracy on exits, coverage and FNR on exits at the certified thresholds,
and how many seeds certified.

Usage:
    python benchmarks/bench_train_crc.py                                   # cached vs crc, 3 seeds, both rules
    python benchmarks/bench_train_crc.py --variants cached crc --seeds 5 --rules band
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from head_vs_probe import POOL, _load_pool, _run_with_splits  # noqa: E402

DEMO_IMAGES = 5000
DEMO_FRACTIONS = (0.4, 0.1, 0.3, 0.2)
VARIANTS: dict[str, dict] = {
    "cached": {},
    "crc": {"train": {"mode": "train_crc"}},
    "crc_sr": {"train": {"mode": "train_crc", "crc_score": "softmax_response"}},
    "cached_gate": {"train": {"loss": {"gate_correctness": 1.0}}},
    "crossfit": {"model": {"head_gate": "crossfit"}},
    "crc_crossfit": {"model": {"head_gate": "crossfit"}, "train": {"mode": "train_crc"}},
    "crossfit_forced": {"model": {"head_gate": "crossfit"}, "calibration": {"gate_score": "gate"}},
}
"""Overrides on top of the demo's settings, by name."""

METRICS = ("aurc", "aurc_gate", "aurc_softmax_response", "accuracy_on_exits", "coverage", "fnr_on_exits", "accuracy")


def demo_splits(table, ids: set[str], seed: int) -> dict[str, list[str]]:
    """``DEMO_IMAGES`` pool images drawn with ``seed`` and split with the demo's fractions."""
    rng = np.random.default_rng([seed, DEMO_IMAGES])
    pool = sorted(ids)
    drawn = [pool[k] for k in rng.permutation(len(pool))[:DEMO_IMAGES]]
    bounds = np.cumsum([round(f * DEMO_IMAGES) for f in DEMO_FRACTIONS])
    names = ("train", "val_select", "val_calib", "test")
    starts = (0, *bounds[:-1])
    return {name: drawn[a:b] for name, a, b in zip(names, starts, bounds, strict=True)}


def run_variant(work: Path, seed: int, name: str, rules: list[str]) -> list[dict]:
    """Train variant ``name`` on seed ``seed``'s demo split, calibrate per rule, report on test."""
    from roadwork_cli.calibration.api import calibrate_run, read_scores_csv
    from roadwork_cli.calibration.estimator import SelectiveConformal
    from roadwork_cli.config import deep_merge, load_settings
    from roadwork_cli.errors import InfeasibleError
    from roadwork_cli.pipeline import DEMO_DEFAULTS
    from roadwork_cli.reporting.evaluate import compute_report
    from roadwork_cli.training.api import train

    loaded = _load_pool(POOL)
    splits = demo_splits(loaded["table"], loaded["ids"], seed)
    cell = work / f"s{seed}_{name}"
    run = _run_with_splits(cell, POOL, loaded["fingerprint"], loaded["table"], splits)
    flags = deep_merge(deep_merge({}, DEMO_DEFAULTS), VARIANTS[name])
    flags = deep_merge(flags, {"runtime": {"run": str(run.root), "device": "cpu"}, "train": {"seed": seed}})
    settings = load_settings(None, flags, environ={})
    started = time.perf_counter()
    train(run, settings)
    train_seconds = time.perf_counter() - started
    results = []
    for rule in rules:
        settings.calibration.rule = rule
        settings.calibration.allow_infeasible = True
        try:
            calibrated = calibrate_run(run, settings.calibration)
        except InfeasibleError as error:  # not raised with allow_infeasible; kept for older settings
            calibrated = error.result
        estimator = SelectiveConformal.load(run.scaling, run.scrc_params)
        report = compute_report(read_scores_csv(run.scores / "test.csv"), estimator)
        row = {"variant": name, "seed": seed, "rule": rule, "certified": bool(calibrated.feasible)}
        row.update({m: report.get(m) for m in METRICS})
        row["gate_score"] = calibrated.scaling.get("gate_score")
        row["auto_at_tau"] = _choose_at_tau(run, settings.calibration.fnr)
        row["train_seconds"] = train_seconds
        results.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(cell, ignore_errors=True)
    return results


def _choose_at_tau(run, alpha: float) -> str:
    """What ``gate_score: auto`` would pick if it compared the AURCs at the rule's operating threshold instead of at
    p >= 0.5: tau estimated on val_select as the alpha-quantile of calibrated p among its roadwork images."""
    from roadwork_cli.calibration.api import read_scores_csv
    from roadwork_cli.calibration.estimator import SelectiveConformal
    from roadwork_cli.calibration.scaling import softmax_response
    from roadwork_cli.metrics.selective import aurc

    select = read_scores_csv(run.scores / "val_select.csv")
    rule = SelectiveConformal.load(run.scaling, run.scrc_params)
    p = rule.cls_scaler.transform(select.p)
    g = rule.gate_scaler.transform(select.gate)
    tau = float(np.quantile(p[select.label == 1], alpha))
    losses = ((p >= tau).astype(int) != select.label).astype(float)
    return "gate" if aurc(g, losses) <= aurc(softmax_response(p), losses) else "softmax_response"


def summarise(results: list[dict]) -> str:
    """Markdown table: one row per (variant, rule), mean +- sd over seeds."""

    def stat(values: list) -> str:
        v = np.array([np.nan if x is None else x for x in values], dtype=float)
        return f"{np.nanmean(v):.4f} ± {np.nanstd(v, ddof=1) if v.size > 1 else 0.0:.4f}"

    header = ["variant", "rule", "seeds", "certified", *METRICS, "auto picks gate", "auto@tau picks gate", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, rule in dict.fromkeys((r["variant"], r["rule"]) for r in results):
        group = [r for r in results if (r["variant"], r["rule"]) == (variant, rule)]
        cells = [variant, rule, str(len(group)), str(sum(r["certified"] for r in group))]
        cells += [stat([r[m] for r in group]) for m in METRICS]
        cells += [
            str(sum(r["gate_score"] == "gate" for r in group)),
            str(sum(r["auto_at_tau"] == "gate" for r in group)),
            f"{np.mean([r['train_seconds'] for r in group]):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["cached", "crc"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rules", nargs="+", default=["gate", "band"], choices=["gate", "band"])
    parser.add_argument("--work", type=Path, default=Path("runs/bench_train_crc"))
    parser.add_argument("--out", type=Path, default=None, help="Also write the per-seed rows as JSON here.")
    parser.add_argument("--table", type=Path, nargs="+", help="Only print the table of these --out files (merged).")
    args = parser.parse_args()
    if args.table:
        print(summarise([row for path in args.table for row in json.loads(path.read_text())["rows"]]))
        return
    import torch

    torch.set_num_threads(1)
    if not (POOL / "features").exists():
        raise SystemExit(f"No feature pool at {POOL}; run `python benchmarks/head_vs_probe.py --pool-only` first.")
    started = time.perf_counter()
    results = [
        r
        for seed in range(args.seeds)
        for name in args.variants
        for r in run_variant(args.work, seed, name, args.rules)
    ]
    table = summarise(results)
    print(table)
    print(f"{time.perf_counter() - started:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
