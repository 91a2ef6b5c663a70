"""Does the product's ``train_cached`` head learn at least what a linear probe learns on the same cached features?

A pool of synthetic scenes (``synthetic:N``) is split and cached ONCE with the default backbone
(``efficientnet_lite0``, fully offline) into ``--pool``. Every cell then draws, per seed, a training set of n images
(balanced, or 1 positive in 4), a val_select of n / 5 images with the same class ratio (the ratio of the default
``data.fractions``) and a fixed-size test set, writes them as a ``splits.json`` of a small run that links the pool's
features, and fits:

* head: :func:`roadwork_cli.training.api.train` with the default settings (what ``roadwork train`` does);
* probe: scikit-learn ``LogisticRegression`` on standardised features, C chosen by 5-fold cross-validation on
  train + val_select, fit on train + val_select.

Both are calibrated the same way: Platt scaling fit on val_select (what ``calibration.scaling: platt`` does), on
the scores of the same recipe fit on train alone, since both final fits saw val_select. Reported
per cell as mean +- standard deviation over seeds: test AUROC, MCC at calibrated p >= 0.5 and AURC (softmax response
as the selection score; lower is better). The last column says whether the cell passes (head AUROC >= probe AUROC -
0.002 and head MCC >= probe MCC, averaged over seeds).

Data: the built-in synthetic scenes only; no real street images are available offline. The pool (7000 scenes) takes
about 15 minutes to cache on 2 busy CPU cores, once; the grid (8 cells x 5 seeds) then took 1949 s with ``--jobs 2``
on 2 shared, busy CPU cores (load ~6), most of it the probe solved to tolerance 1e-8 at n >= 1000.

Usage:
    python benchmarks/head_vs_probe.py                    # full grid (n 100..3000, 2 ratios, 5 seeds)
    python benchmarks/head_vs_probe.py --sizes 100 300 --seeds 3
    python benchmarks/head_vs_probe.py --pool-only        # build the feature pool and stop
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from bench_data import write_splits

POOL = Path("runs/head_vs_probe/pool")
POOL_IMAGES = 7000
TEST_SIZE = 1000
AUROC_MARGIN = 0.002


def build_pool(pool: Path, n_images: int) -> Path:
    """Render, split and cache ``synthetic:n_images`` in ``pool`` (both stages resume/reuse their artifacts)."""
    from roadwork_cli.config import load_settings
    from roadwork_cli.data.splits import build_splits
    from roadwork_cli.features.cache import cache_features
    from roadwork_cli.io.run import RunDir

    settings = load_settings(
        None, {"data": {"sources": [f"synthetic:{n_images}"]}, "runtime": {"run": str(pool)}}, environ={}
    )
    run = RunDir(pool).ensure()
    if not run.splits.exists():
        build_splits(settings.data.sources, settings.data, run)
    started = time.perf_counter()
    summary = cache_features(run, settings, progress=True)
    print(f"pool: {summary.total} images, {summary.computed} computed in {time.perf_counter() - started:.0f} s")
    return pool


def _run_with_splits(root: Path, pool: Path, fingerprint: str, table, splits: dict[str, list[str]]):
    """A run whose splits.json holds ``splits`` (ids of the pool) and whose features are the pool's (linked)."""
    from roadwork_cli.io.records import CurrentFeatures, write_current
    from roadwork_cli.io.run import RunDir

    if root.exists():
        shutil.rmtree(root)
    run = RunDir(root).ensure()
    ids = [i for split_ids in splits.values() for i in split_ids]
    samples = {i: {"path": table.paths[i], "label": table.labels[i], "source": "synthetic", "group": i} for i in ids}
    write_splits(run.splits, splits, samples)
    run.features.mkdir()
    run.feature_cache(fingerprint).symlink_to((pool / "features" / fingerprint).resolve(), target_is_directory=True)
    write_current(run, CurrentFeatures(fingerprint=fingerprint, backbone="efficientnet_lite0"))
    return run


def _read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, p_roadwork) of a scores CSV."""
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["p_roadwork"]) for r in rows])


def draw_cell(table, cached_ids: set[str], n_train: int, positive_share: float, seed: int) -> dict[str, list[str]]:
    """Train (n), val_select (n / 5) and a fixed test set (TEST_SIZE, same ratio for every seed) of the pool."""
    by_class = {c: sorted(i for i in cached_ids if table.labels[i] == c) for c in (0, 1)}
    fixed = np.random.default_rng(12345)
    for c in (0, 1):
        by_class[c] = [by_class[c][k] for k in fixed.permutation(len(by_class[c]))]
    n_test_pos = round(TEST_SIZE * positive_share)
    test = by_class[1][:n_test_pos] + by_class[0][: TEST_SIZE - n_test_pos]
    rest = {1: by_class[1][n_test_pos:], 0: by_class[0][TEST_SIZE - n_test_pos :]}
    rng = np.random.default_rng([seed, n_train, round(positive_share * 100)])
    drawn = {}
    for c in (0, 1):
        drawn[c] = [rest[c][k] for k in rng.permutation(len(rest[c]))]
    n_select = n_train // 5
    out = {"train": [], "val_select": [], "val_calib": [], "test": test}
    taken = {0: 0, 1: 0}
    for split, size in (("train", n_train), ("val_select", n_select)):
        positives = round(size * positive_share)
        for c, count in ((1, positives), (0, size - positives)):
            out[split] += drawn[c][taken[c] : taken[c] + count]
            taken[c] += count
        order = rng.permutation(len(out[split]))
        out[split] = [out[split][k] for k in order]
    return out


def _selective_metrics(y: np.ndarray, p_test: np.ndarray, p_test_calibrated: np.ndarray) -> dict[str, float]:
    from roadwork_cli.calibration.scaling import softmax_response
    from roadwork_cli.metrics.classification import auroc, mcc
    from roadwork_cli.metrics.selective import aurc

    pred = (p_test_calibrated >= 0.5).astype(int)
    return {
        "auroc": auroc(y, p_test),
        "mcc": mcc(y, pred),
        "aurc": aurc(softmax_response(p_test_calibrated), (pred != y).astype(float)),
    }


def head_cell(run, overrides: dict | None = None) -> dict[str, float]:
    """The product's train_cached head with default settings (plus ``overrides``), Platt on val_select."""
    from roadwork_cli.calibration.scaling import create_scaler
    from roadwork_cli.config import deep_merge, load_settings
    from roadwork_cli.training.api import train

    flags = deep_merge({"runtime": {"run": str(run.root), "device": "cpu"}}, overrides or {})
    settings = load_settings(None, flags, environ={})
    train(run, settings)
    y_select, p_select = _read_scores(run.scores / "val_select.csv")
    y_test, p_test = _read_scores(run.scores / "test.csv")
    scaler = create_scaler("platt").fit(p_select, y_select)
    return _selective_metrics(y_test, p_test, scaler.transform(p_test))


def probe_cell(features: np.ndarray, rows: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Standardised L2 logistic regression, C by 5-fold CV on train + val_select, fit there, Platt on val_select.

    The folds are those the head's ``train.cls_fit=logistic_cv`` draws (``stratified_folds`` with the default
    ``train.seed``), a paired design: with independently drawn folds the two differ by fold noise alone (the C picked
    and the Platt fit), which on 5 seeds is as large as the margins compared. Both are solved to tight tolerance.
    Platt is fit on val_select's probabilities from the same recipe fit on train alone (C by 5-fold CV on train), not
    on those of the final fit, which saw val_select: the held-out treatment the head's ``scores/val_select.csv`` gets.
    """
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit
    from sklearn.preprocessing import StandardScaler

    from roadwork_cli.calibration.scaling import create_scaler
    from roadwork_cli.training.logistic import C_GRID, stratified_folds

    x_fit = features[np.concatenate([rows["train"], rows["val_select"]])].astype(np.float64)
    y_fit = np.concatenate([labels["train"], labels["val_select"]])
    folds = PredefinedSplit(stratified_folds(torch.from_numpy(y_fit), 5, seed=0).numpy())
    scaler = StandardScaler().fit(x_fit)
    z_fit = scaler.transform(x_fit)
    solver = {"max_iter": 10_000, "tol": 1e-8}
    probe = LogisticRegressionCV(Cs=list(C_GRID), cv=folds, scoring="neg_log_loss", **solver).fit(z_fit, y_fit)
    x_train, y_train = features[rows["train"]].astype(np.float64), labels["train"]
    train_scaler = StandardScaler().fit(x_train)
    train_folds = PredefinedSplit(stratified_folds(torch.from_numpy(y_train), 5, seed=0).numpy())
    on_train = LogisticRegressionCV(Cs=list(C_GRID), cv=train_folds, scoring="neg_log_loss", **solver)
    on_train.fit(train_scaler.transform(x_train), y_train)
    p_select = on_train.predict_proba(train_scaler.transform(features[rows["val_select"]].astype(np.float64)))[:, 1]
    p_test = probe.predict_proba(scaler.transform(features[rows["test"]].astype(np.float64)))[:, 1]
    scaler = create_scaler("platt").fit(p_select, labels["val_select"])
    return _selective_metrics(labels["test"], p_test, scaler.transform(p_test))


_POOL: dict = {}


def _load_pool(pool: Path) -> dict:
    """The pool's split table and features, loaded once per process."""
    if _POOL.get("path") != pool:
        from roadwork_cli.features.cache import load_cached, read_split_table
        from roadwork_cli.io.run import RunDir

        pool_run = RunDir(pool)
        fingerprint = next(pool_run.features.glob("*/meta.json")).parent.name  # the pool holds one backbone
        cached = load_cached(pool_run, fingerprint)
        _POOL.update(
            path=pool,
            table=read_split_table(pool_run),
            fingerprint=fingerprint,
            cached=cached,
            features=cached.features.numpy(),  # (R, D)
            ids={i for i, views in cached.rows.items() if 0 in views},
        )
    return _POOL


def run_cell(task: tuple) -> list[dict]:
    """One (n, share, seed) cell: the probe once, then the head under each settings variant."""
    import torch

    pool, work, n_train, share, seed, variants = task
    torch.set_num_threads(1)
    loaded = _load_pool(pool)
    table, cached = loaded["table"], loaded["cached"]
    splits = draw_cell(table, loaded["ids"], n_train, share, seed)
    rows = {k: np.array([cached.rows[i][0] for i in v], dtype=int) for k, v in splits.items()}
    labels = {k: np.array([table.labels[i] for i in v]) for k, v in splits.items()}
    probe = probe_cell(loaded["features"], rows, labels)
    results = []
    for number, overrides in enumerate(variants):
        cell = work / f"n{n_train}_p{round(share * 100)}_s{seed}_v{number}"
        run = _run_with_splits(cell, pool, loaded["fingerprint"], table, splits)
        head = head_cell(run, overrides)
        shutil.rmtree(cell, ignore_errors=True)
        results.append({"variant": number, "n": n_train, "share": share, "seed": seed, "head": head, "probe": probe})
        print(
            f"v{number} n={n_train:5d} pos={share:.2f} seed={seed} head auroc {head['auroc']:.4f} mcc {head['mcc']:.4f}"
            f" | probe auroc {probe['auroc']:.4f} mcc {probe['mcc']:.4f}",
            flush=True,
        )
    return results


def run_grid(pool: Path, sizes, shares, seeds: int, work: Path, variants: list, jobs: int = 1) -> list[dict]:
    """Every (n, positive share, seed) cell, ``jobs`` cells at a time: head (per variant) and probe metrics."""
    tasks = [(pool, work, n, share, seed, variants) for n in sizes for share in shares for seed in range(seeds)]
    tasks.sort(key=lambda task: -task[2])  # largest cells first: they set the wall time
    if jobs <= 1:
        return [r for task in tasks for r in run_cell(task)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as workers:
        return [r for cell in workers.imap_unordered(run_cell, tasks) for r in cell]


def summarise(results: list[dict]) -> tuple[str, bool]:
    """Markdown table (mean +- sd over seeds) and whether every cell passes."""
    lines = [
        "| n train | positives | head AUROC | probe AUROC | head MCC | probe MCC | head AURC | probe AURC | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    all_pass = True
    cells = sorted({(r["n"], r["share"]) for r in results})
    for n_train, share in cells:
        group = [r for r in results if (r["n"], r["share"]) == (n_train, share)]

        def stat(model: str, metric: str, group=group) -> tuple[float, str]:
            values = np.array([r[model][metric] for r in group])
            return float(values.mean()), f"{values.mean():.4f} ± {values.std(ddof=1) if values.size > 1 else 0:.4f}"

        (ha, has), (pa, pas) = stat("head", "auroc"), stat("probe", "auroc")
        (hm, hms), (pm, pms) = stat("head", "mcc"), stat("probe", "mcc")
        (_, hrs), (_, prs) = stat("head", "aurc"), stat("probe", "aurc")
        ok = ha >= pa - AUROC_MARGIN and hm >= pm
        all_pass &= ok
        lines.append(
            f"| {n_train} | {share:.2f} | {has} | {pas} | {hms} | {pms} | {hrs} | {prs} | {'yes' if ok else 'NO'} |"
        )
    return "\n".join(lines), all_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=POOL)
    parser.add_argument("--pool-images", type=int, default=POOL_IMAGES)
    parser.add_argument("--pool-only", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 3000])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("runs/head_vs_probe/cells"))
    parser.add_argument(
        "--head-overrides",
        type=json.loads,
        default=[{}],
        help="JSON settings merged into the head's defaults, or a list of such objects (one table each).",
    )
    parser.add_argument("--jobs", type=int, default=1, help="Cells computed in parallel (one thread each).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the per-seed results as JSON here.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # sklearn's deprecation notices, per worker
    if not (args.pool / "features" / "current.json").exists():  # written when the pool's cache is complete
        build_pool(args.pool, args.pool_images)
    if args.pool_only:
        return
    started = time.perf_counter()
    variants = args.head_overrides if isinstance(args.head_overrides, list) else [args.head_overrides]
    results = run_grid(args.pool, args.sizes, args.shares, args.seeds, args.work, variants, args.jobs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"variants": variants, "results": results}, indent=1))
    all_pass = True
    for number, overrides in enumerate(variants):
        table, passed = summarise([r for r in results if r["variant"] == number])
        all_pass &= passed
        print(f"\nhead settings: defaults + {json.dumps(overrides)}\n{table}")
    print(f"{'every cell passes' if all_pass else 'SOME CELLS FAIL'} ({time.perf_counter() - started:.0f} s)")
    raise SystemExit(0 if all_pass else 1)


if __name__ == "__main__":
    main()
