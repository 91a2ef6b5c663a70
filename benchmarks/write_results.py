"""``make bench``'s last step: end-to-end paths against the bare forward, then ``benchmarks/RESULTS.md``.

Measures, in this process and interleaved so that a drifting machine load hits both sides alike:

* ``predict`` (``Stage1Model.predict``: decode, preprocess, forward, head, calibrated rule, DataLoader workers) and
  ``cache-features`` (``features.cache.cache_features``: the same decode, forward, fp16 shards, index) in images/s on
  640x480 and on 4032x3024 JPEGs, each against the bare backbone forward at its best layout (batch size and memory
  format from ``bench_forward.py``) measured right before and right after it; the ratio is taken per round and the
  median over rounds is reported;
* the decode bound of each row: on C cores the forward costs F = C x 1000 / (bare images/s) core-milliseconds per
  image and the decode path D (measured in this process, CPU time), so no overlap of the two on the same cores can go
  beyond F / (F + D) of the bare forward;
* ``predict`` on 4032x3024 JPEGs with the DINOv3 ViT-S/16 and ViT-B/16 architectures (random weights: none can be
  downloaded here, and the cost does not depend on them), the product's backbones, whose heavier forward leaves the
  decode a smaller share;
* ``roadwork predict one.jpg --bundle B`` start-up as a fresh subprocess, best of 3;

and writes a Markdown table from those figures plus ``runs/bench/forward.json`` (``bench_forward.py``) and
``runs/bench/precision.json`` (``bench_precision.py``), with the machine's details.

Usage:
    python benchmarks/write_results.py [--bench-dir runs/bench] [--out benchmarks/RESULTS.md] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_splits  # noqa: E402
from bench_forward import images_per_second, machine_details  # noqa: E402
from bench_predict import decode_cpu_ms, make_jpegs, make_run, predict_path, startup_seconds  # noqa: E402

SIZES = {"640x480": ((640, 480), 128, 128), "4032x3024": ((4032, 3024), 12, 64)}
"""Label -> (size, distinct JPEGs written, images per pass). Large photos are repeated to fill a pass: writing
4032x3024 noise JPEGs costs seconds each, and decoding cost does not depend on a file having been seen before."""

GOALS = {("predict", "640x480"): 0.9, ("predict", "4032x3024"): 0.85}
"""Speed goals of the product backbones' table: end-to-end images/s as a fraction of the bare forward."""

CEILING_GOAL = 0.95
"""Goal of the end-to-end table (issue 22): images/s >= 0.95 of the decode ceiling F / (F + D), per runtime."""

STARTUP_GOAL_S = 1.5

PRODUCT_BACKBONES = {"dinov3_vits16": 16, "dinov3_vitb16": 8}
"""DINOv3 architectures measured on 4032x3024 JPEGs (random weights) -> batch size."""


def write_split(root: Path, paths: list[Path]):
    """A run whose splits.json puts every path (repeats allowed, one id each) in train: what cache-features reads."""
    from roadwork_cli.io.run import RunDir

    run = RunDir(root).ensure()
    ids = [f"{k:05d}" for k in range(len(paths))]
    samples = {
        i: {"path": str(p), "label": k % 2, "source": str(p.parent), "group": i}
        for k, (i, p) in enumerate(zip(ids, paths, strict=True))
    }
    splits = {"train": ids, "val_select": [], "val_calib": [], "test": []}
    write_splits(run.splits, splits, samples)
    return run


def onnx_model(work: Path):
    """The benchmark run exported with ``--onnx`` and loaded in onnxruntime (None where onnxruntime is missing)."""
    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle
    from roadwork_cli.model.onnx_graph import onnxruntime_available
    from roadwork_cli.stage1 import load_bundle

    if not onnxruntime_available():
        return None
    run = make_run(work / "onnx-model", "efficientnet_lite0")
    return load_bundle(export_bundle(run, work / "onnx.tar", Settings(export={"onnx": True})), runtime="onnx")


def onnx_images_per_second(model, batch_size: int, seconds: float = 2.0) -> float:
    """Images/s of an ONNX model's graph (backbone + head, all cores) on one in-memory normalised batch."""
    import time

    import numpy as np

    from roadwork_cli.data.pixels import normalize_pixels

    size = model.preprocessing.size
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    data = normalize_pixels(pixels, model.preprocessing)  # (B, 3, S, S)
    model.graph(data)  # warm-up
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or images < 2 * batch_size:
        model.graph(data)
        images += batch_size
    return images / (time.perf_counter() - started)


def end_to_end(work: Path, best: dict, rounds: int) -> list[dict]:
    """Predict and cache-features vs the bare forward of the same runtime, per image size (rows of the table).

    Each path runs as a user gets it: CPU streams (``streams: auto``), at the CPU default batch size; predict also
    with the runtime of an ``--onnx`` bundle against the graph's own bare forward, and once the way it ran before
    streams (2 decode workers beside one forward) to show what they changed; the GPU default batch sizes too (eager).
    The bare eager forward runs at its best layout.
    """
    from roadwork_cli.config import CPU_BATCH_SIZE, load_settings
    from roadwork_cli.features.cache import cache_features
    from roadwork_cli.stage1 import Stage1Model

    batch_size, channels_last = best["batch_size"], best["channels_last"]
    models = {"eager": Stage1Model.from_run(make_run(work / "model", "efficientnet_lite0"), device="cpu")}
    graph = onnx_model(work)
    if graph is not None:
        models["onnx"] = graph
    # (path, runtime, batch size, streams): None streams = decode workers beside one forward (before streams)
    configs = [
        ("predict", "eager", CPU_BATCH_SIZE, "auto"),
        ("predict", "eager", CPU_BATCH_SIZE, None),
        ("predict", "eager", 32, "auto"),
        *([("predict", "onnx", CPU_BATCH_SIZE, "auto")] if graph is not None else []),
        ("cache-features", "eager", CPU_BATCH_SIZE, "auto"),
        ("cache-features", "eager", 64, "auto"),
    ]
    rows = []
    for label, (size, distinct, count) in SIZES.items():
        files = make_jpegs(work / label, distinct, size=size)
        paths = [files[k % distinct] for k in range(count)]
        run = write_split(work / f"cache-{label}", paths)
        settings = load_settings(
            None,
            {
                "runtime": {"run": str(run.root), "device": "cpu"},
                "model": {"backbone": "efficientnet_lite0"},
                "features": {"channels_last": channels_last},
            },
            environ={},
        )
        decode_ms = {"eager": decode_cpu_ms(models["eager"], files)}
        if graph is not None:
            decode_ms["onnx"] = decode_cpu_ms_pixels(graph, files)
        bare_backbone = copy.deepcopy(models["eager"].backbone)  # timed at the best layout; predict keeps its own

        def bare(runtime: str, backbone=bare_backbone) -> float:
            if runtime == "onnx":
                return onnx_images_per_second(graph, batch_size)
            return on_fresh_thread(lambda: images_per_second(backbone, batch_size, channels_last))

        measured: dict[tuple, list[tuple[float, float]]] = {config: [] for config in configs}
        for _ in range(rounds):
            for config in configs:
                path, runtime, b, streams = config
                before = bare(runtime)
                if path == "predict":
                    workers = settings.predict.workers
                    speed = predict_path(models[runtime], paths, b, workers, jpeg_draft=True, streams=streams)
                else:
                    shutil.rmtree(run.features, ignore_errors=True)
                    settings.features.batch_size = b
                    speed = cache_features(run, settings, backbone=models["eager"].backbone).images_per_second
                after = bare(runtime)
                measured[config].append((speed, (before + after) / 2))
        for (path, runtime, b, streams), pairs in measured.items():
            bare_img_s = statistics.median(x for _, x in pairs)
            rows.append(
                {
                    "path": path,
                    "runtime": runtime,
                    "batch_size": b,
                    "streams": streams,
                    "size": label,
                    "img_s": round(statistics.median(p for p, _ in pairs), 1),
                    "bare_img_s": round(bare_img_s, 1),
                    "ratio": round(statistics.median(p / x for p, x in pairs), 3),
                    "ratio_per_round": [round(p / x, 3) for p, x in pairs],
                    "goal": CEILING_GOAL if (b == CPU_BATCH_SIZE and streams) else None,
                    "workers": settings.predict.workers if path == "predict" else settings.features.workers,
                    **decode_bound(decode_ms[runtime], bare_img_s, cores=stream_cores()),
                }
            )
    return rows


def on_fresh_thread(measure):
    """``measure()`` on a new thread with torch's intra-op threads set there, as a stream runs its forward.

    On this (shared) machine a forward on such a thread ran up to several times faster than on the main thread with
    the same thread count, so a bare forward timed on the main thread would flatter every end-to-end ratio.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    threads = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=1, initializer=lambda: torch.set_num_threads(threads)) as pool:
        return pool.submit(measure).result()


def stream_cores() -> int:
    """Cores the forward runs on (the streams' plan shares out the same cores)."""
    from roadwork_cli.runtime.streams import cpu_cores

    return cpu_cores()


def decode_cpu_ms_pixels(model, paths: list[Path]) -> float:
    """CPU milliseconds per image of the torch-free decode path (the ONNX runtime's) in this process."""
    import time

    from roadwork_cli.data.pixels import read_pixels

    read_pixels(paths[0], model.recipe)  # warm-up
    started = time.process_time()
    for path in paths:
        read_pixels(path, model.recipe)
    return (time.process_time() - started) / len(paths) * 1000


def decode_bound(decode_ms: float, bare_img_s: float, cores: int | None = None) -> dict:
    """The decode's CPU cost per image and the ratio no overlap with the forward on these cores can exceed.

    ``cores``: the cores the bare forward ran on (default torch's intra-op threads).
    """
    import torch

    forward_ms = (cores or torch.get_num_threads()) * 1000 / bare_img_s  # core-milliseconds per image
    return {
        "decode_cpu_ms": round(decode_ms, 1),
        "forward_cpu_ms": round(forward_ms, 1),
        "bound": round(forward_ms / (forward_ms + decode_ms), 3),
    }


def product_backbones(work: Path, rounds: int) -> list[dict]:
    """``predict`` on 4032x3024 JPEGs vs the bare forward, DINOv3 architectures (channels-last, random weights)."""
    from roadwork_cli.stage1 import Stage1Model

    size, distinct, _ = SIZES["4032x3024"]
    files = make_jpegs(work / "4032x3024", distinct, size=size)
    rows = []
    for name, batch_size in PRODUCT_BACKBONES.items():
        model = Stage1Model.from_run(make_run(work / name, name, random_weights=True), device="cpu")
        paths = [files[k % distinct] for k in range(4 * batch_size)]
        pairs = []
        for _ in range(rounds):
            before = images_per_second(model.backbone, batch_size, True)
            predict = predict_path(model, paths, batch_size, 2, jpeg_draft=True)
            after = images_per_second(model.backbone, batch_size, True)
            pairs.append((predict, (before + after) / 2))
        bare = statistics.median(b for _, b in pairs)
        rows.append(
            {
                "backbone": name,
                "batch_size": batch_size,
                "img_s": round(statistics.median(p for p, _ in pairs), 2),
                "bare_img_s": round(bare, 2),
                "ratio": round(statistics.median(p / b for p, b in pairs), 3),
                "ratio_per_round": [round(p / b, 3) for p, b in pairs],
                "goal": GOALS[("predict", "4032x3024")],
                **decode_bound(decode_cpu_ms(model, files), bare),
            }
        )
    return rows


def startup(work: Path) -> float:
    """Best of 3 wall times of ``roadwork predict one.jpg --bundle B`` (fresh process: imports, load, one image)."""
    from roadwork_cli.config import load_settings
    from roadwork_cli.export import export_bundle

    run = make_run(work / "startup", "efficientnet_lite0")
    # The random head is not certified; start-up cost does not depend on that.
    settings = load_settings(None, {"export": {"allow_uncertified": True, "onnx": False}}, environ={})  # torch path
    bundle = export_bundle(run, work / "startup.tar", settings)
    image = make_jpegs(work / "one", 1)[0]
    return startup_seconds(bundle, image, repeats=3)


def _fmt(value, digits: int = 1, unit: str = "") -> str:
    return "not measured" if value is None else f"{value:,.{digits}f}{unit}"


def _ratio_row(label: str, row: dict, of_ceiling: bool = False) -> str:
    """One table row of an end-to-end / bare ratio with its decode bound (older JSON without the bound: blank).

    ``of_ceiling``: the goal is on ratio / bound (the end-to-end table), not on the ratio itself.
    """
    bound = row.get("bound")
    held = row["ratio"] / bound if of_ceiling and bound else row["ratio"]
    goal = "" if row["goal"] is None else f">= {row['goal']} ({'met' if held >= row['goal'] else 'MISSED'})"
    cells = [
        label, str(row["img_s"]), str(row["bare_img_s"]), f"{row['ratio']:.3f}",
        ", ".join(f"{r:.3f}" for r in row["ratio_per_round"]),
        _fmt(row.get("decode_cpu_ms")) if bound else "", _fmt(row.get("forward_cpu_ms")) if bound else "",
        f"{bound:.3f}" if bound else "", f"{row['ratio'] / bound:.2f}" if bound else "", goal,
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _e2e_label(row: dict) -> str:
    if "streams" not in row:  # JSON from before streams
        return f"{row['path']} (batch {row.get('batch_size', '?')}, {row['workers']} workers)"
    how = f"streams {row['streams']}" if row["streams"] else f"{row['workers']} workers beside"
    return f"{row['path']} (batch {row['batch_size']}, {how})"


def render_streams(streams: dict | None) -> list[str]:
    """The scaling table of ``bench_streams.py``'s JSON (a line saying how to measure it where there is none)."""
    lines = ["", "## predict with 1, 2, 4, 8, 16 CPU streams (`benchmarks/bench_streams.py`)", ""]
    if not streams:
        return lines + ["not measured (run `benchmarks/bench_streams.py --out runs/bench/streams.json`)."]
    load = streams["loadavg_1_5_15"]
    lines += [
        f"Each stream decodes a batch of {streams['batch_size']} and then runs its forward on one intra-op thread "
        f"(`predict.streams` = S, `runtime.threads` = 1), on {streams['images']} {streams['image_size']}s; this host "
        f"has {streams['cores']} cores, so S stops there. Efficiency = images/s at S / (S x images/s at 1 stream); "
        f"goal >= {streams['goal']} up to 8 streams. Load average at the end: {load[0]} / {load[1]} / {load[2]}.",
        "",
        "| runtime | streams | images/s | per round | speed-up | efficiency | goal | bare forward on 1 thread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in streams["runtimes"].items():
        for row in entry["rows"]:
            goal = ""
            if 1 < row["streams"] <= 8:
                goal = f">= {streams['goal']} ({'met' if row['efficiency'] >= streams['goal'] else 'MISSED'})"
            cells = [
                name, str(row["streams"]), str(row["img_s"]), ", ".join(map(str, row["per_round"])),
                f"{row['speedup']:.2f}", f"{row['efficiency']:.3f}", goal, str(entry["bare_one_thread_img_s"]),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(
    machine: dict,
    forward: dict,
    precision: dict | None,
    rows: list[dict],
    startup_s: float | None,
    onnx: dict | None = None,
    product: list[dict] | None = None,
    streams: dict | None = None,
) -> str:
    """RESULTS.md from the collected figures (``onnx``: ``bench_predict.py --onnx-out``'s JSON, if measured)."""
    best = forward["best"]
    layout = f"{'channels-last' if best['channels_last'] else 'contiguous'}, batch {best['batch_size']}"
    load = machine["loadavg_1_5_15"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`benchmarks/write_results.py`), which keeps the sections other benchmarks add after "
        "its own. Backbone "
        f"`{forward['backbone']}` at {forward['image_size']} px, CPU only.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {machine['cpu_model']} ({machine['vendor']}, family {machine['cpu_family']}) |",
        f"| cores / torch threads | {machine['cores']} / {machine['threads']} |",
        f"| clock | {_fmt(machine['ghz'], 2)} GHz |",
        f"| speed-relevant flags | {' '.join(machine['flags']) or 'none'} |",
        f"| virtualised | {machine['hypervisor'] or 'no'} |",
        f"| torch | {machine['torch']} |",
        f"| date | {machine['date']} |",
        f"| load average (1/5/15 min) at start | {load[0]} / {load[1]} / {load[2]} |",
        "",
        f"Load note: the load average above counts runnable processes on {machine['cores']} cores. Where it exceeds "
        "the core count the machine was shared with other work while measuring: absolute images/s are then low and "
        "noisy, while ratios measured in the same rounds (end to end / bare, bf16 / fp32) stay comparable.",
        "",
        "## End to end vs the bare forward (same run, interleaved rounds)",
        "",
        f"Bare forward = the runtime's own forward on in-memory tensors, all cores: eager = backbone alone at its "
        f"best layout ({layout}); ONNX = the bundle's graph (backbone + head) in onnxruntime, same batch. Ratio = "
        "median over rounds of (end-to-end images/s) / (bare images/s of the same runtime measured right before and "
        f"after it). Decode ceiling: the forward costs F = {machine['cores']} cores x 1000 / (bare images/s) core-ms "
        "per image and the decode path (read, DCT-scaled JPEG decode, resize, crop) D core-ms, measured as CPU time; "
        "when both share the same cores no overlap can go beyond F / (F + D) of the bare forward. Streams "
        "(`predict.streams`, `features.streams`, auto here) run each batch's decode and then its forward on the "
        'stream\'s own cores; "2 workers beside" is how predict ran before them: decode workers beside one forward '
        "on every core. The goal is ratio / ceiling >= 0.95 at the CPU default batch size.",
        "",
        "| path | runtime | JPEG size | images/s | bare forward images/s | ratio | per round | decode CPU ms/img | "
        "forward CPU ms/img | decode ceiling | ratio / ceiling | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        _ratio_row(f"{_e2e_label(row)} | {row.get('runtime', 'eager')} | {row['size']}", row, of_ceiling=True)
        for row in rows
    ]
    lines += render_streams(streams)
    if product:
        lines += [
            "",
            "## predict on 4032x3024 JPEGs with the product's backbones (DINOv3 architectures)",
            "",
            "The same measurement with `dinov3_vits16` and `dinov3_vitb16` (random weights, channels-last; 2 decode "
            "workers). The decode costs the same; the heavier forward leaves it a smaller share of the CPU.",
            "",
            "| backbone (batch) | images/s | bare forward images/s | ratio | per round | decode CPU ms/img | forward "
            "CPU ms/img | decode bound | ratio / bound | goal |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_ratio_row(f"{row['backbone']} ({row['batch_size']})", row) for row in product]
    lines += [
        "",
        "## Bare forward by layout (fp32, eager)",
        "",
        "| memory format | batch | images/s |",
        "|---|---|---|",
    ]
    for row in forward["layouts"]:
        fmt = "channels-last" if row["channels_last"] else "contiguous"
        lines.append(f"| {fmt} | {row['batch_size']} | {row['img_s']} |")
    lines += [
        "",
        f"## Precision and runtime (bare forward, {layout})",
        "",
        "| runtime | images/s | note |",
        "|---|---|---|",
    ]
    for name, label in (("fp32", "eager fp32"), ("bf16", "eager bf16 autocast"), ("onnx", "ONNX")):
        entry = forward["precision"][name]
        lines.append(f"| {label} | {_fmt(entry['img_s'])} | {entry['note']} |")
    fraction = forward["fraction_of_nominal_peak"]
    lines += [
        "",
        "## FLOP rate",
        "",
        "| | |",
        "|---|---|",
        f"| FLOPs per image (`FlopCounterMode`, multiply-add = 2) | {forward['flops_per_image'] / 1e9:.3f} GFLOP |",
        f"| bare forward at best layout | {forward['achieved_flop_s'] / 1e9:.1f} GFLOP/s |",
        f"| nominal fp32 peak | {_fmt(forward['nominal_peak_flop_s'] and forward['nominal_peak_flop_s'] / 1e9)} "
        f"GFLOP/s ({forward['nominal_peak_assumption']}) |",
        f"| fp32 matmul ceiling (2048x2048, measured) | {forward['matmul_ceiling_flop_s'] / 1e9:.1f} GFLOP/s |",
        f"| bf16 matmul ceiling (2048x2048, measured) | {forward['matmul_ceiling_bf16_flop_s'] / 1e9:.1f} GFLOP/s |",
        f"| fraction of nominal peak | {_fmt(fraction and 100 * fraction, 1, ' %')} |",
        f"| fraction of the matmul ceiling | {100 * forward['fraction_of_matmul_ceiling']:.1f} % |",
        "",
        "## Predict start-up for one image",
        "",
        "`roadwork predict one.jpg --bundle B --format jsonl` as a fresh subprocess (imports, bundle verification and "
        f"load, one 640x480 image), best of 3: **{_fmt(startup_s, 2, ' s')}** with the torch path "
        f"(bundle exported without ONNX). The goal of {STARTUP_GOAL_S} s is the ONNX path's: "
        + (
            "not measured (run `benchmarks/bench_predict.py --onnx-out runs/bench/onnx.json`)."
            if onnx is None
            else f"**{onnx['startup_s']['onnx']:.2f} s** wall, {onnx['startup_cpu_s']['onnx']:.2f} s of CPU (user + "
            "sys), with the bundle's model.onnx in onnxruntime, torch never imported (wall "
            f"{'met' if onnx['startup_s']['onnx'] <= STARTUP_GOAL_S else 'MISSED'}, CPU "
            f"{'met' if onnx['startup_cpu_s']['onnx'] <= STARTUP_GOAL_S else 'MISSED'}); the same bundle run by "
            f"PyTorch in that run: {onnx['startup_s']['torch']:.2f} s wall, "
            f"{onnx['startup_cpu_s']['torch']:.2f} s CPU. "
            f"Load average {' / '.join(f'{v:.1f}' for v in onnx['loadavg_1_5_15'])} on {onnx['cpu_count']} cores at "
            "the end of that run: where it exceeds the cores, wall time mostly waits for a core, and the CPU time is "
            "what an idle machine's wall time would be, give or take."
        ),
    ]
    if onnx is not None:
        lines += [
            "",
            "## ONNX runtime vs eager PyTorch (one bundle, alternating rounds)",
            "",
            f"`{onnx['backbone']}` bundle exported with `--onnx` (export check: max abs diff "
            f"{onnx['export_max_abs_diff']:.2g} of the raw scores); {onnx['images']} {onnx['image_size']}, batch "
            f"{onnx['batch_size']}, {onnx['workers']} decode workers (DataLoader processes for eager, threads for "
            f"ONNX); medians of {onnx['rounds']} rounds. Goal: ONNX >= eager.",
            "",
            "| | eager images/s | ONNX images/s | ONNX / eager | per round |",
            "|---|---|---|---|---|",
        ]
        for label, key in (("predict end to end", "predict"), ("bare forward (backbone + head)", "bare")):
            rounds = ", ".join(f"{r:.3f}" for r in onnx[f"{key}_ratio_per_round"])
            lines.append(
                f"| {label} | {onnx[f'{key}_img_s']['torch']} | {onnx[f'{key}_img_s']['onnx']} | "
                f"{onnx[f'{key}_onnx_over_eager']:.3f} | {rounds} |"
            )
    lines += ["", "## bf16 verdict", ""]
    if precision is None:
        lines.append("not measured (run `benchmarks/bench_precision.py --out runs/bench/precision.json`).")
    else:
        speed, decisions, run = precision["speed"], precision["decisions"], precision["run"]
        verdict = precision["verdict"]
        lines += [
            f"Run: `synthetic:{2 * run['per_class']}` (the demo's stages and defaults, targets FNR <= "
            f"{run['calibration']['fnr']} at coverage {run['calibration']['coverage']}, delta "
            f"{run['calibration']['delta']}; certified: {run['certified']}), head and calibration from fp32 features; "
            f"the {decisions['test_images']} test images ({decisions['test_positives']} roadwork) scored through "
            "`Stage1Model.predict` in fp32 and with bf16 features.",
            "",
            "| | fp32 | bf16 |",
            "|---|---|---|",
            f"| bare forward images/s (median of alternating rounds) | {speed['fp32_img_s']} | {speed['bf16_img_s']} |",
        ]
        for key, label in (
            ("coverage", "coverage"),
            ("fnr_on_exits", "FNR on exits"),
            ("accuracy_on_exits", "accuracy on exits"),
        ):
            lines.append(f"| {label} (test) | {decisions['fp32'][key]:.4f} | {decisions['bf16'][key]:.4f} |")
        changes = ", ".join(f"{k}: {v}" for k, v in decisions["changes"].items()) or "none"
        lines += [
            "",
            f"Decisions changed: **{decisions['decisions_changed']} of {decisions['test_images']}** ({changes}); "
            f"max |dp| {decisions['max_abs_p_roadwork_diff']:.4f}, "
            f"mean |dp| {decisions['mean_abs_p_roadwork_diff']:.4f}.",
            "",
            f"Verdict: **bf16 {'becomes' if verdict['bf16_cpu_default'] else 'does not become'} the CPU default** "
            f"({verdict['why']}).",
        ]
    return "\n".join(lines) + "\n"


def _sections(markdown: str) -> list[tuple[str, str]]:
    """``(heading, text)`` of each ``## `` section of a Markdown file, the text running up to the next one."""
    sections: list[tuple[str, str]] = []
    for part in ("\n" + markdown).split("\n## ")[1:]:
        sections.append((part.split("\n", 1)[0].strip(), "## " + part.rstrip("\n") + "\n"))
    return sections


def keep_other_sections(table: str, previous: str) -> str:
    """``table`` followed by the sections of ``previous`` it does not write itself, in their order.

    Other benchmarks (serving, NATIX, MAPIE, Ray, train_crc) add their own sections to RESULTS.md; a new run of this
    script replaces only the sections it renders, so their figures are never lost to a regeneration.
    """
    own = {heading for heading, _ in _sections(table)}
    kept = [text for heading, text in _sections(previous) if heading not in own]
    return table.rstrip("\n") + "\n\n" + "\n".join(kept) if kept else table


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", type=Path, default=Path("runs/bench"), help="Where the benchmarks' JSON is.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved end-to-end rounds per image size.")
    parser.add_argument(
        "--render-only", action="store_true", help="Re-write the table from the saved JSON without measuring."
    )
    args = parser.parse_args(argv)

    from roadwork_cli.io.atomic import atomic_write_json, atomic_write_text

    forward = json.loads((args.bench_dir / "forward.json").read_text())
    precision_file = args.bench_dir / "precision.json"
    precision = json.loads(precision_file.read_text()) if precision_file.exists() else None
    streams_file = args.bench_dir / "streams.json"
    streams = json.loads(streams_file.read_text()) if streams_file.exists() else None
    onnx_file = args.bench_dir / "onnx.json"
    onnx = json.loads(onnx_file.read_text()) if onnx_file.exists() else None
    saved = args.bench_dir / "end_to_end.json"
    if not args.render_only:
        os.makedirs(args.bench_dir, exist_ok=True)
        machine = machine_details()
        with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
            rows = end_to_end(Path(tmp), forward["best"], args.rounds)
            # Saved after each step: a failure later must not throw away minutes of measurements.
            measured = {"machine": machine, "rows": rows, "startup_s": None, "product": None}
            atomic_write_json(saved, measured)
            measured["product"] = product_backbones(Path(tmp), args.rounds)
            atomic_write_json(saved, measured)
            measured["startup_s"] = startup(Path(tmp))
            atomic_write_json(saved, measured)
    measured = json.loads(saved.read_text())
    table = render(
        measured["machine"],
        forward,
        precision,
        measured["rows"],
        measured["startup_s"],
        onnx,
        measured.get("product"),
        streams,
    )
    if args.out.exists():
        table = keep_other_sections(table, args.out.read_text())
    atomic_write_text(args.out, table)
    print(args.out.read_text())
    return args.out


if __name__ == "__main__":
    main()
