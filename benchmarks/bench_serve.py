"""``roadwork serve`` under load vs ``roadwork predict`` in one process, on the same bundle and the same files.

Loopback only, bounded in requests and time. One ``efficientnet_lite0`` bundle exported with ONNX (the product's
offline default backbone; random head, fixed thresholds: speed does not depend on them):

1. ready time: from starting ``roadwork serve`` (a fresh process) to ``GET /readyz`` = 200, per start, and the CPU
   seconds of that server's processes over its start and stop (what an idle machine's wall time would be, roughly);
2. the bare forward of batch 1: the bundle's ONNX graph on one preprocessed 224x224 input (median), the yardstick
   of the latency goal;
3. ``predict``: ``load_bundle`` + ``iter_predict`` over the files with predict's default batch size and decode
   workers, as ``roadwork predict`` runs them, images/s, measured right before and after each size's served setups
   (the mean is the yardstick: a shared machine's load drifts);
4. ``serve``: 1, 4 and 16 concurrent clients (threads, one keep-alive connection each) posting one JPEG per request,
   224x224 and 640x480, ``--requests`` per setup: images/s, p50/p99 latency, and the batches the workers formed
   (from ``/metrics``).

Goals (issue 20): served images/s at 16 clients >= 0.8x predict's; p99 for one client on a 224x224 JPEG <= 3x one bare
forward of batch 1; ready in <= 2 s for an ONNX bundle.

Usage:
    python benchmarks/bench_serve.py [--requests 200] [--out runs/bench/serve.json] [--max-batch-size 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import make_jpegs, make_run  # noqa: E402

from roadwork_cli.serving import multipart_body  # noqa: E402

SIZES = {"224x224": (224, 224), "640x480": (640, 480)}
CLIENTS = (1, 4, 16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def start_server(bundle: Path, port: int, args: list[str], deadline_s: float = 120.0) -> tuple[subprocess.Popen, float]:
    """A ``roadwork serve`` process and the seconds from its start to ``/readyz`` = 200."""
    command = [sys.executable, "-m", "roadwork_cli", "serve", "--bundle", str(bundle), "--port", str(port), *args]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = started + deadline_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"roadwork serve exited {proc.returncode}")
        try:
            if get(port, "/readyz")[0] == 200:
                return proc, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"not ready within {deadline_s} s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=30)


def metric_sums(port: int) -> dict[str, float]:
    """Counts and sums of the batch histograms from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = get(port, "/metrics")[1].decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("roadwork_serve_batch") and not sample.name.endswith("_created"):
                key = sample.name + (f"{{le={sample.labels['le']}}}" if "le" in sample.labels else "")
                sums[key] = sample.value
    return sums


def load(port: int, files: list[Path], clients: int, requests: int, time_limit_s: float) -> dict:
    """``requests`` single-image posts spread over ``clients`` threads; latencies and throughput."""
    bodies = [multipart_body([(p.name, p.read_bytes())]) for p in files]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    stop_at = time.perf_counter() + time_limit_s

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for i in counter:  # the shared iterator bounds the total
                if time.perf_counter() > stop_at:
                    return
                body, content_type = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                seconds = time.perf_counter() - t0
                with lock:
                    latencies.append(seconds)
                    if response.status != 200:
                        failures.append(str(response.status))
        finally:
            connection.close()

    before = metric_sums(port)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = metric_sums(port)
    n_batches = after["roadwork_serve_batch_requests_count"] - before.get("roadwork_serve_batch_requests_count", 0)
    in_batches = after["roadwork_serve_batch_requests_sum"] - before.get("roadwork_serve_batch_requests_sum", 0)
    buckets = {
        key.split("le=")[1].rstrip("}"): after[key] - before.get(key, 0)
        for key in after
        if key.startswith("roadwork_serve_batch_requests_bucket")
    }
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": len(failures),
        "img_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
        "batches": int(n_batches),
        "mean_batch": round(in_batches / max(n_batches, 1), 2),
        "max_batch_le": min((float(le) for le, n in buckets.items() if n == n_batches and le != "+Inf"), default=None),
    }


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bare_batch1_ms(model, repeats: int = 200) -> float:
    from roadwork_cli.data.pixels import normalize_pixels

    size = model.preprocessing.size
    pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    data = normalize_pixels(pixels, model.preprocessing)
    for _ in range(10):
        model.graph(data)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.graph(data)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def predict_img_s(model, files: list[Path], n: int) -> float:
    from roadwork_cli.config import Settings

    settings = Settings()
    paths = [files[i % len(files)] for i in range(n)]
    list(model.iter_predict(paths[:16], batch_size=settings.predict.batch_size, workers=settings.predict.workers))
    started = time.perf_counter()
    predictions = list(
        model.iter_predict(paths, batch_size=settings.predict.batch_size, workers=settings.predict.workers)
    )
    seconds = time.perf_counter() - started
    assert all(p.error is None for p in predictions)
    return len(paths) / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="Requests per setup.")
    parser.add_argument("--images", type=int, default=32, help="Distinct JPEGs per size.")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--starts", type=int, default=3, help="Server starts timed for the ready time.")
    parser.add_argument("--time-limit", type=float, default=120.0, help="Seconds per setup at most.")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle
    from roadwork_cli.stage1 import load_bundle

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        run = make_run(work / "run", args.backbone)
        bundle = export_bundle(run, work / "onnx.tar", Settings(export={"onnx": True}))
        files = {name: make_jpegs(work / name, args.images, size=size) for name, size in SIZES.items()}
        model = load_bundle(bundle)
        assert model.runtime == "onnx"
        bare_ms = bare_batch1_ms(model)

        serve_args = ["--quiet", "--max-batch-size", str(args.max_batch_size)]
        serve_args += ["--batch-timeout-ms", str(args.batch_timeout_ms)]
        ready, ready_cpu = [], []
        for _ in range(args.starts):
            cpu_before = _children_cpu()
            proc, seconds = start_server(bundle, free_port(), serve_args)
            ready.append(seconds)
            stop_server(proc)
            ready_cpu.append(_children_cpu() - cpu_before)  # start + stop, every process of the server
        port = free_port()
        proc, _ = start_server(bundle, port, serve_args)
        setups, predict = [], {}
        try:
            for name, paths in files.items():
                # predict measured right before and after this size's setups: the shared machine's load drifts
                before = predict_img_s(model, paths, args.requests)
                results = [load(port, paths, clients, args.requests, args.time_limit) for clients in CLIENTS]
                after = predict_img_s(model, paths, args.requests)
                predict[name] = {
                    "before": round(before, 1),
                    "after": round(after, 1),
                    "mean": round((before + after) / 2, 1),
                }
                for result in results:
                    result["size"] = name
                    result["vs_predict"] = round(result["img_s"] / predict[name]["mean"], 3)
                    setups.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            exit_code = stop_server(proc)

    p99_one_224 = next(s["p99_ms"] for s in setups if s["size"] == "224x224" and s["clients"] == 1)
    summary = {
        "backbone": args.backbone,
        "runtime": "onnx",
        "requests_per_setup": args.requests,
        "max_batch_size": args.max_batch_size,
        "batch_timeout_ms": args.batch_timeout_ms,
        "ready_s": [round(r, 2) for r in ready],
        "ready_start_stop_cpu_s": [round(r, 2) for r in ready_cpu],
        "ready_goal_s": 2.0,
        "bare_batch1_ms": round(bare_ms, 2),
        "predict_img_s": predict,
        "setups": setups,
        "p99_one_client_224_over_bare": round(p99_one_224 / bare_ms, 2),
        "serve_exit_code": exit_code,
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
