"""Per-image latency of the NATIX miner's detector against the validator's 9 s budget.

One ``efficientnet_lite0`` bundle exported with ONNX (random head: latency does not depend on it) and a remap; the
detector's core (``NatixPredictor.from_files``, what the generated ``ROADWORK_STAGE1`` detector's ``load_model``
calls) is loaded in this process, and each image goes the validator's way: a 224x224 JPEG, base64, decoded by PIL.
Reported: the load time, the first call, and the median / p99 / max of the following calls.

Usage:
    python benchmarks/bench_natix.py [--calls 100] [--out runs/bench/natix.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import make_jpegs, make_run  # noqa: E402

BUDGET_S = 9.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from PIL import Image

    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle
    from roadwork_cli.io.atomic import atomic_write_json
    from roadwork_cli.natix import NatixPredictor, NatixRemap

    with tempfile.TemporaryDirectory(prefix="bench_natix_") as tmp:
        work = Path(tmp)
        run = make_run(work / "run", args.backbone)
        bundle = export_bundle(run, work / "onnx.tar", Settings(export={"onnx": True}))
        remap = work / "natix_remap.json"
        atomic_write_json(remap, NatixRemap(0.42).to_dict())
        payloads = [base64.b64encode(p.read_bytes()).decode() for p in make_jpegs(work / "jpegs", 16, (224, 224))]

        started = time.perf_counter()
        predictor = NatixPredictor.from_files(bundle, remap)
        load_s = time.perf_counter() - started
        times = []
        for i in range(args.calls + 1):
            t0 = time.perf_counter()
            image = Image.open(io.BytesIO(base64.b64decode(payloads[i % len(payloads)])))  # the miner's decode
            answer = predictor(image)
            times.append(time.perf_counter() - t0)
            assert 0.0 <= answer <= 1.0
    steady = np.asarray(times[1:])
    summary = {
        "backbone": args.backbone,
        "runtime": predictor.model.runtime,
        "load_s": round(load_s, 3),
        "first_call_ms": round(times[0] * 1000, 1),
        "steady_median_ms": round(float(np.median(steady)) * 1000, 1),
        "steady_p99_ms": round(float(np.percentile(steady, 99)) * 1000, 1),
        "steady_max_ms": round(float(steady.max()) * 1000, 1),
        "budget_s": BUDGET_S,
        "calls": args.calls,
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
