"""How ``predict`` scales with CPU streams: 1, 2, 4, 8, 16 streams (as many as the host has cores), eager and ONNX.

Each stream decodes a batch and then runs its forward with one intra-op thread (``runtime.threads: 1``), so S streams
use S cores. Measured in one process on 640x480 JPEGs, rounds interleaved (a drifting load hits every S alike):

* images/s of ``predict`` at S streams;
* speed-up over one stream, and the scaling efficiency = images/s(S) / (S x images/s(1)) (goal >= 0.8 up to 8);
* the runtime's bare forward on one thread, for scale.

``write_results.py`` renders ``--out``'s JSON as the scaling table of benchmarks/RESULTS.md.

Usage:
    python benchmarks/bench_streams.py [--out runs/bench/streams.json] [--rounds 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench_forward import print_results
from bench_predict import bare_forward, bare_onnx, make_jpegs, make_run, predict_path

STREAMS = (1, 2, 4, 8, 16)
SCALING_GOAL = 0.8
"""Images/s at S streams >= 0.8 x S x images/s at one stream, up to 8 streams (issue 22)."""


def models(work: Path) -> dict:
    """The benchmark run as an eager model and, where onnxruntime is installed, as an ``--onnx`` bundle's graph."""
    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle
    from roadwork_cli.model.onnx_graph import onnxruntime_available
    from roadwork_cli.stage1 import Stage1Model, load_bundle

    run = make_run(work / "run", "efficientnet_lite0")
    out = {"eager": Stage1Model.from_run(run, device="cpu")}
    if onnxruntime_available():
        bundle = export_bundle(run, work / "onnx.tar", Settings(export={"onnx": True}))
        out["onnx"] = load_bundle(bundle, runtime="onnx", threads=1)
    return out


def bare_one_thread(name: str, model, batch_size: int) -> float:
    """The runtime's bare forward (backbone + head) on one thread, images/s."""
    import torch

    if name == "onnx":
        return bare_onnx(model, batch_size, 6)  # its session was opened with one thread
    from concurrent.futures import ThreadPoolExecutor

    # On a thread of its own, as a stream runs it (write_results.on_fresh_thread says why).
    with ThreadPoolExecutor(max_workers=1, initializer=lambda: torch.set_num_threads(1)) as pool:
        return pool.submit(bare_forward, model, batch_size, 6).result()


def run(rounds: int, batch_size: int, cores: int | None = None) -> dict:
    """Every measurement of this module, as one JSON-ready dict."""
    from roadwork_cli.runtime.streams import cpu_cores

    cores = cores or cpu_cores()
    counts = [s for s in STREAMS if s <= cores]
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        work = Path(tmp)
        files = make_jpegs(work / "images", 32)
        paths = [files[k % len(files)] for k in range(4 * batch_size * max(counts))]  # 4 batches per stream
        runtimes = models(work)
        speeds: dict[str, dict[int, list[float]]] = {name: {s: [] for s in counts} for name in runtimes}
        bare: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(rounds):
            for name, model in runtimes.items():
                model.threads = 1
                bare[name].append(bare_one_thread(name, model, batch_size))
                for s in counts:
                    speeds[name][s].append(predict_path(model, paths, batch_size, 0, jpeg_draft=True, streams=s))
    result = {"cores": cores, "batch_size": batch_size, "image_size": "640x480 JPEG q90", "images": len(paths)}
    result["goal"] = SCALING_GOAL
    result["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    result["runtimes"] = {}
    for name, per_s in speeds.items():
        one = statistics.median(per_s[1])
        rows = []
        for s, values in per_s.items():
            img_s = statistics.median(values)
            rows.append(
                {
                    "streams": s,
                    "img_s": round(img_s, 1),
                    "per_round": [round(v, 1) for v in values],
                    "speedup": round(img_s / one, 2),
                    "efficiency": round(img_s / (s * one), 3),
                }
            )
        result["runtimes"][name] = {"bare_one_thread_img_s": round(statistics.median(bare[name]), 1), "rows": rows}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="Also write the results JSON here.")
    args = parser.parse_args(argv)
    return print_results(run(args.rounds, args.batch_size), args.out)


if __name__ == "__main__":
    main()
