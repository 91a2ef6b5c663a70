"""Our SCRC-I certificate against MAPIE's Learn-then-Test controller (the field's reference), by simulation.

Many calibration draws from a known population (the model of ``tests/calibration/test_guarantee.py``); on each, our
``scan_and_pick`` and MAPIE's ``BinaryClassificationController`` (FNR on exits and the abstention rate written as MAPIE
risks; Bonferroni-Holm, and a fixed sequence learned on val_select) choose a threshold pair on the same data, over the
same outer grid (lambda for gate, b for band, built from val_select exactly as our rule builds it) and, for MAPIE, a
common tau grid (MAPIE needs a finite one; ours scans every tau between calibration scores). Reported per method:
the violation rate of "FNR on exits <= alpha and coverage >= xi" on the population, how often a pair was certified,
how many pairs of the common grid were certified, and the population accuracy on exits, coverage and FNR at the
chosen pair, and, per-draw paired with ours, the difference in accuracy on exits. For the gate rule a row
``ours_iut_sketch`` measures what MAPIE's coverage construction would give our certificate (``iut_gate``: not in
the product). The adapters live in ``tests/calibration/mapie_reference.py`` (shared with the regression test).

Needs ``mapie`` (the ``dev`` extra). One core, about 0.5 s per gate draw and 0.1 s per band draw.

Usage:
    python benchmarks/bench_mapie_reference.py                           # both settings, both rules, 200 draws
    python benchmarks/bench_mapie_reference.py --trials 50 --rules gate --out runs/bench/mapie_reference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "calibration"))  # the shared adapters and population model

SETTINGS = {
    "alpha05": {"alpha": 0.05, "delta": 0.1, "xi": 0.8, "n_calib": 2000, "n_select": 1000},
    "demo_like": {"alpha": 0.02, "delta": 0.1, "xi": 0.8, "n_calib": 1500, "n_select": 500},
}
"""Named settings: the statistical tests' targets and sizes, and the demo's targets at the demo's split sizes."""


def run(settings: list[str], rules: list[str], trials: int, seed: int) -> list[dict]:
    from mapie_reference import Population, Setting, compare

    population = Population()
    rows = []
    for name in settings:
        for rule in rules:
            setting = Setting(rule=rule, **SETTINGS[name])
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MAPIE warns when every pair (or none) is valid
                draws = compare(setting, trials, seed, population, iut=True)
            seconds = time.perf_counter() - start
            for method in draws.rates:
                row = {"setting": name, **asdict(setting), "method": method, "seconds": seconds,
                       **draws.summary(method, setting.alpha, setting.xi)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = [
        "| setting | rule | method | violation rate (delta) | certified draws | certified pairs on the common grid | "
        "accuracy on exits | coverage | FNR on exits | accuracy - ours, paired (se) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} (alpha {r['alpha']:g}, xi {r['xi']:g}, n {r['n_calib']}) | {r['rule']} | {r['method']} "
            f"| {r['violation_rate']:.3f} ({r['delta']:g}) | {r['certified_share']:.2f} | "
            f"{r['mean_certified_pairs']:.1f} | {r['mean_accuracy_on_exits']:.4f} | {r['mean_coverage']:.4f} | "
            f"{r['mean_fnr_on_exits']:.4f} | "
            + ("" if r["method"] == "ours" else f"{r['accuracy_minus_ours']:+.4f} ({r['accuracy_minus_ours_se']:.4f})")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rules", nargs="+", default=["gate", "band"], choices=["gate", "band"])
    parser.add_argument("--trials", type=int, default=200, help="Calibration draws per setting and rule.")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "mapie_reference.json")
    args = parser.parse_args(argv)

    import mapie

    rows = run(args.settings, args.rules, args.trials, args.seed)
    markdown = table(rows)
    print(markdown)
    from roadwork_cli.io.atomic import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"mapie_version": mapie.__version__, "trials": args.trials, "seed": args.seed,
                                 "rows": rows, "table": markdown})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
