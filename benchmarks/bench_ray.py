"""What does Ray Data cost on one node? ``predict --engine ray`` against plain ``predict`` over the same JPEGs.

Both are the real command in a fresh subprocess over the same folder of 640x480 photo-like JPEGs, with the same ONNX
bundle (``efficientnet_lite0``, random head) and predict's defaults; rounds alternate plain and Ray so that a change
in the machine's load hits both. Figures per run: wall time from start to exit (imports, bundle loading, and for Ray
starting the local instance and its actors, all included) and the rate each command prints itself. The headline is
the overhead ratio ``ray img/s / plain img/s`` on wall time. The records of the two engines are compared, too.

Usage:
    python benchmarks/bench_ray.py [--images 1000] [--rounds 1] [--actors N] [--out runs/bench/ray.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_predict import make_jpegs, make_run

RATE = re.compile(r"([\d,.]+) img/s")


def run_predict(folder: Path, bundle: Path, out: Path, extra: list[str]) -> dict:
    """One ``roadwork predict`` subprocess: wall seconds, the rate it printed, its exit code."""
    command = [sys.executable, "-m", "roadwork_cli", "predict", str(folder), "--bundle", str(bundle)]
    command += ["--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    printed = RATE.search(done.stderr)
    return {
        "wall_s": round(wall, 2),
        "printed_img_s": float(printed.group(1).replace(",", "")) if printed else None,
        "summary": done.stderr.strip().splitlines()[-1],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--actors", type=int, default=None, help="Ray actors (default: the machine's CPUs)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ray.json"))
    args = parser.parse_args(argv)

    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        work = Path(tmp)
        folder = work / "frames"
        make_jpegs(folder, args.images)
        run = make_run(work / "run", "efficientnet_lite0")
        bundle = export_bundle(run, work / "bundle.tar", Settings(export={"onnx": True}))
        ray_flags = ["--engine", "ray", "--overwrite"] + (["--ray-actors", str(args.actors)] if args.actors else [])
        plain_runs, ray_runs = [], []
        for _ in range(args.rounds):
            plain_runs.append(run_predict(folder, bundle, work / "plain.jsonl", []))
            ray_runs.append(run_predict(folder, bundle, work / "ray.jsonl", ray_flags))
        plain = [json.loads(line) for line in (work / "plain.jsonl").read_text().splitlines()]
        ray = [json.loads(line) for line in (work / "ray.jsonl").read_text().splitlines()]
    same_order = [r["path"] for r in plain] == [r["path"] for r in ray]
    max_dp = max(abs(a["p_roadwork"] - b["p_roadwork"]) for a, b in zip(plain, ray, strict=True))
    decisions = sum(a["decision"] != b["decision"] for a, b in zip(plain, ray, strict=True))

    def rate(runs: list[dict]) -> float:
        return args.images / min(r["wall_s"] for r in runs)  # best of the rounds

    result = {
        "images": args.images,
        "size": "640x480",
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "actors": args.actors or "default (CPUs / threads)",
        "plain": plain_runs,
        "ray": ray_runs,
        "plain_wall_img_s": round(rate(plain_runs), 1),
        "ray_wall_img_s": round(rate(ray_runs), 1),
        "overhead_ratio": round(rate(ray_runs) / rate(plain_runs), 3),
        "records_same_order": same_order,
        "max_abs_dp": max_dp,
        "decisions_changed": decisions,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
