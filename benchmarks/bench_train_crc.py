"""train_cached vs train_crc (cached) on demo data and on a harder setting, 3+ seeds, at the certified point.

Data: a pool of demo images with cached ``efficientnet_lite0`` features, built once with the CLI and reused
(default ``runs/demo5k``: ``roadwork split --source synthetic:5000 --fractions 0.4,0.1,0.3,0.2 --run runs/demo5k``
then ``roadwork cache-features --run runs/demo5k``). Per seed, up to 5000 pool images with cached features are drawn
and split with the demo's fractions (0.4 / 0.1 / 0.3 / 0.2); the seed is also the training seed.

Settings (``--settings``):

* ``demo``: the pool's features as they are;
* ``hard``: a harder problem from the same images: the first ``HARD_DIMS`` feature dimensions only, plus Gaussian
  noise of ``HARD_NOISE`` times each dimension's spread (overlapping classes; written once as its own pool).

Each variant is trained with the demo's settings (``pipeline.DEMO_DEFAULTS``) plus its own overrides, calibrated
with SCRC-I (the demo's targets FNR <= 2 %, coverage >= 80 %, delta 0.1; ``--rules`` picks the stage-1 rules,
infeasible calibrations are reported, not raised) and scored on test with the same report code as
``roadwork evaluate``.

Reported per setting, variant and rule, mean +- sd over seeds, on test: AURC of the rule's selection score, AURC of
the calibrated gate head and of the softmax response max(p, 1-p) (risk = error of the exit decision), accuracy on
exits, coverage and FNR on exits at the certified thresholds, and how many seeds certified.

Usage:
    python benchmarks/bench_train_crc.py --out benchmarks/results/train_crc.json       # demo + hard, 3 seeds
    python benchmarks/bench_train_crc.py --variants cached crc crc_sr --seeds 5 --rules gate --settings hard
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

from head_vs_probe import _load_pool, _run_with_splits  # noqa: E402

POOL = Path("runs/demo5k")
HARD_DIMS = 64
HARD_NOISE = 0.5
SETTINGS = ("demo", "hard")
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
    """Up to ``DEMO_IMAGES`` pool images drawn with ``seed`` and split with the demo's fractions."""
    rng = np.random.default_rng([seed, DEMO_IMAGES])
    pool = sorted(ids)
    n = min(DEMO_IMAGES, len(pool))
    drawn = [pool[k] for k in rng.permutation(len(pool))[:n]]
    bounds = np.cumsum([round(f * n) for f in DEMO_FRACTIONS])
    bounds[-1] = n
    names = ("train", "val_select", "val_calib", "test")
    starts = (0, *bounds[:-1])
    return {name: drawn[a:b] for name, a, b in zip(names, starts, bounds, strict=True)}


def hard_pool(pool: Path, work: Path) -> Path:
    """The ``hard`` setting's pool (written once): the pool's images, ``HARD_DIMS`` noisy feature dimensions."""
    import torch

    from roadwork_cli.features.cache import load_cached, write_feature_cache
    from roadwork_cli.io.atomic import read_json
    from roadwork_cli.io.records import CurrentFeatures, write_current
    from roadwork_cli.io.run import RunDir

    target = work / f"hard_pool_d{HARD_DIMS}_n{HARD_NOISE:g}"
    if (target / "features").exists():
        return target
    source = RunDir(pool)
    fingerprint = next(source.features.glob("*/meta.json")).parent.name
    cached = load_cached(source, fingerprint)
    keys = [(i, 0) for i, views in sorted(cached.rows.items()) if 0 in views]
    base = cached.features[[cached.rows[i][0] for i, _ in keys]][:, :HARD_DIMS]
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(HARD_DIMS)) * base.std(dim=0)
    meta = read_json(source.feature_meta(fingerprint))
    meta["feature_dim"] = HARD_DIMS
    meta.setdefault("backbone", {})["feature_dim"] = HARD_DIMS
    run = RunDir(target).ensure()
    shutil.copy(source.splits, run.splits)
    write_feature_cache(run.feature_cache(fingerprint), meta, keys, base + HARD_NOISE * noise)
    write_current(run, CurrentFeatures(fingerprint=fingerprint, backbone="efficientnet_lite0"))
    return target


def run_variant(work: Path, pool: Path, setting: str, seed: int, name: str, rules: list[str]) -> list[dict]:
    """Train variant ``name`` on seed ``seed``'s demo split of ``pool``, calibrate per rule, report on test."""
    from roadwork_cli.calibration.api import calibrate_run, read_scores_csv
    from roadwork_cli.calibration.estimator import SelectiveConformal
    from roadwork_cli.config import deep_merge, load_settings
    from roadwork_cli.errors import InfeasibleError
    from roadwork_cli.pipeline import DEMO_DEFAULTS
    from roadwork_cli.reporting.evaluate import compute_report
    from roadwork_cli.training.api import train

    loaded = _load_pool(pool)
    splits = demo_splits(loaded["table"], loaded["ids"], seed)
    cell = work / f"{setting}_s{seed}_{name}"
    run = _run_with_splits(cell, pool, loaded["fingerprint"], loaded["table"], splits)
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
        row = {"setting": setting, "variant": name, "seed": seed, "rule": rule, "certified": bool(calibrated.feasible)}
        row["images"] = sum(len(v) for v in splits.values())
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

    header = ["setting", "variant", "rule", "seeds", "certified", *METRICS, "auto picks gate", "auto@tau picks gate"]
    header.append("train s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    key = lambda r: (r.get("setting", "demo"), r["variant"], r["rule"])  # noqa: E731
    for cell in dict.fromkeys(key(r) for r in results):
        group = [r for r in results if key(r) == cell]
        cells = [*cell, str(len(group)), str(sum(r["certified"] for r in group))]
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
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--pool", type=Path, default=POOL, help="A run with splits.json and cached features.")
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
    if not (args.pool / "features").exists():
        raise SystemExit(f"No feature pool at {args.pool}; build it with `roadwork split` + `cache-features`.")
    started = time.perf_counter()
    pools = {"demo": args.pool}
    if "hard" in args.settings:
        pools["hard"] = hard_pool(args.pool, args.work)
    results = [
        r
        for setting in args.settings
        for seed in range(args.seeds)
        for name in args.variants
        for r in run_variant(args.work, pools[setting], setting, seed, name, args.rules)
    ]
    table = summarise(results)
    print(table)
    print(f"{time.perf_counter() - started:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
