"""How close does ``roadwork predict`` come to the bare backbone forward, and how fast does it start?

Measured in one process, on the same backbone and batch size:

1. bare forward: the backbone (+ head) on preprocessed tensors already in memory (img/s) -- the ceiling;
2. predict path: ``Stage1Model.predict`` over a folder of 640x480 JPEGs with DataLoader workers (decode, resize,
   forward, head, calibration, decision) -- with and without the JPEG draft (DCT-scaled) decode;
3. start-up: wall time of a ``roadwork predict`` subprocess on one image with an exported bundle.

The goal is predict / bare >= 0.85.

``--onnx-out FILE`` (``make bench`` writes ``runs/bench/onnx.json``, which ``write_results.py`` renders) instead
compares the two runtimes of one bundle exported with ``model.onnx`` (the default): ``roadwork predict`` start-up on
one image (fresh subprocess, best of 3; goal <= 1.5 s for ONNX) and images/s of ``predict`` on 640x480 JPEGs and of
the bare backbone + head forward, eager PyTorch vs onnxruntime in alternating rounds (goal: ONNX >= eager).

Usage:
    python benchmarks/bench_predict.py [--images 256] [--batch-size 32] [--workers 2] [--backbone efficientnet_lite0]
    python benchmarks/bench_predict.py --onnx-out runs/bench/onnx.json [--images 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import photo_frame, write_jpegs


def make_jpegs(folder: Path, n: int, size=(640, 480), seed: int = 0) -> list[Path]:
    """Photo-like JPEGs ``frame_<i>.jpg``: smooth colour fields + texture noise (they compress like real frames)."""
    rng = np.random.default_rng(seed)
    return write_jpegs(folder, n, lambda _: photo_frame(rng, size), name="frame_{:04d}.jpg")


def make_run(root: Path, backbone_name: str, random_weights: bool = False):
    """A run with a random head and fixed thresholds: enough for export and predict.

    ``random_weights`` builds the backbone without its pretrained weights (which cannot be downloaded here) and saves
    them into the run, for speed measurements of architectures such as DINOv3's, whose cost does not depend on them.
    """
    import torch
    from safetensors.torch import save_file

    from roadwork_cli.io.atomic import atomic_write_json
    from roadwork_cli.io.records import BestRecord
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.training.artifacts import write_best

    run = RunDir(root).ensure()
    weights = None
    if random_weights:
        torch.manual_seed(0)
        module = create_backbone(backbone_name, pretrained=False).model
        weights = run.root / "backbone.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    backbone = create_backbone(backbone_name, weights=weights)
    torch.manual_seed(0)
    head = SelectiveHead(backbone.feature_dim, hidden=256, dropout=0.0)
    record = BestRecord(
        head=head.config, backbone=backbone.spec, fingerprint=backbone.fingerprint, epoch=1, select_metric="mcc",
        metric=None, val_select={}, ema=False,
    )  # fmt: skip
    write_best(run, head, record)
    atomic_write_json(run.scrc_params, {"method": "scrc", "thresholds": {"lambda": 0.3, "tau": 0.5}})
    return run


def bare_forward(model, batch_size: int, batches: int) -> float:
    """img/s of backbone + head on in-memory, preprocessed tensors (channels-last, inference mode)."""
    import torch

    from roadwork_cli.data.decode import to_model_input
    from roadwork_cli.runtime.device import autocast

    size = model.preprocessing.size
    pixels = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    data = to_model_input(pixels, model.preprocessing, model.device, model.channels_last)  # (B, 3, S, S)

    def forward():
        with torch.inference_mode(), autocast(model.device, model.compute_dtype):
            model.head(model.backbone(data).float())

    forward()  # warm-up: allocator, kernels
    started = time.perf_counter()
    for _ in range(batches):
        forward()
    return batch_size * batches / (time.perf_counter() - started)


def predict_path(
    model, paths: list[Path], batch_size: int, workers: int, jpeg_draft: bool, streams: int | str | None = None
) -> float:
    """img/s of ``model.predict`` over ``paths`` (``streams``: CPU streams; None: decode workers beside one forward)."""
    model.jpeg_draft = jpeg_draft
    # warm-up (worker start, caches, the streams' sessions)
    model.predict(paths[: batch_size * 2], batch_size=batch_size, workers=workers, streams=streams)
    started = time.perf_counter()
    predictions = model.predict(paths, batch_size=batch_size, workers=workers, streams=streams)
    seconds = time.perf_counter() - started
    assert all(p.error is None for p in predictions)
    return len(paths) / seconds


def bare_onnx(model, batch_size: int, batches: int) -> float:
    """img/s of the bundle's ONNX graph (backbone + head) on in-memory, preprocessed arrays."""
    from roadwork_cli.data.pixels import normalize_pixels

    size = model.preprocessing.size
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    data = normalize_pixels(pixels, model.preprocessing)  # (B, 3, S, S)
    model.graph(data)  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        model.graph(data)
    return batch_size * batches / (time.perf_counter() - started)


def onnx_vs_eager(work: Path, images: int, batch_size: int, workers: int, rounds: int, backbone: str) -> dict:
    """Start-up and images/s of one ONNX bundle run by onnxruntime and by eager PyTorch (module docstring)."""
    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle
    from roadwork_cli.stage1 import load_bundle

    run = make_run(work / "run", backbone)
    bundles = {
        "torch": export_bundle(run, work / "torch.tar", Settings(export={"onnx": False})),
        "onnx": export_bundle(run, work / "onnx.tar", Settings()),  # the default writes model.onnx
    }
    paths = make_jpegs(work / "images", images)
    times = {name: startup_times(bundle, paths[0]) for name, bundle in bundles.items()}
    models = {
        "torch": load_bundle(bundles["onnx"], runtime="torch", device="cpu"),
        "onnx": load_bundle(bundles["onnx"]),
    }
    assert models["onnx"].runtime == "onnx"
    batches = max(2, images // batch_size)
    predict = {"torch": [], "onnx": []}
    bare = {"torch": [], "onnx": []}
    for _ in range(rounds):  # alternating: a drifting machine load hits both runtimes alike
        for name, model in models.items():
            predict[name].append(predict_path(model, paths, batch_size, workers, jpeg_draft=True))
        bare["torch"].append(bare_forward(models["torch"], batch_size, batches))
        bare["onnx"].append(bare_onnx(models["onnx"], batch_size, batches))
    ratio = [o / t for o, t in zip(predict["onnx"], predict["torch"], strict=True)]
    bare_ratio = [o / t for o, t in zip(bare["onnx"], bare["torch"], strict=True)]
    verification = models["onnx"].info["onnx"]["verification"]
    return {
        "backbone": backbone,
        "images": images,
        "image_size": "640x480 JPEG q90",
        "batch_size": batch_size,
        "workers": workers,
        "rounds": rounds,
        "startup_s": {name: t["wall_s"] for name, t in times.items()},
        "startup_cpu_s": {name: t["cpu_s"] for name, t in times.items()},
        "startup_goal_s": 1.5,
        "predict_img_s": {name: round(float(np.median(v)), 1) for name, v in predict.items()},
        "predict_onnx_over_eager": round(float(np.median(ratio)), 3),
        "predict_ratio_per_round": [round(r, 3) for r in ratio],
        "bare_img_s": {name: round(float(np.median(v)), 1) for name, v in bare.items()},
        "bare_onnx_over_eager": round(float(np.median(bare_ratio)), 3),
        "bare_ratio_per_round": [round(r, 3) for r in bare_ratio],
        "export_max_abs_diff": verification["max_abs_diff"],
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()),
    }


def decode_cpu_ms(model, paths: list[Path]) -> float:
    """CPU milliseconds per image of ``model``'s decode path (load, draft decode, resize, crop) in this process."""
    from roadwork_cli.data.decode import ImageDataset, load_input

    transform = ImageDataset([], model.recipe).clean  # (H, W, 3) uint8; normalisation is per batch
    transform(load_input(paths[0], model.recipe))  # warm-up
    started = time.process_time()
    for path in paths:
        transform(load_input(path, model.recipe))
    return (time.process_time() - started) / len(paths) * 1000


def decode_ms(model, paths: list[Path]) -> dict[str, float]:
    """Decode + resize + crop cost per image in this process, with and without the JPEG draft decode."""
    from dataclasses import replace

    from roadwork_cli.data.decode import ImageDataset, load_input

    result = {}
    for label, draft in (("draft", True), ("full", False)):
        recipe = replace(model.recipe, jpeg_draft=draft)
        transform = ImageDataset([], recipe).clean  # (H, W, 3) uint8; normalisation is per batch
        started = time.perf_counter()
        for path in paths:
            transform(load_input(path, recipe))
        result[label] = round((time.perf_counter() - started) / len(paths) * 1000, 2)
    return result


def startup_times(bundle: Path, image: Path, repeats: int = 3) -> dict[str, float]:
    """Best wall and best CPU (user + sys) seconds of ``roadwork predict IMAGE --bundle B`` as a fresh process.

    The CPU time is what the start-up costs whatever else the machine runs: on a shared, overloaded machine the wall
    time mostly measures waiting for a core.
    """
    import resource

    command = [sys.executable, "-m", "roadwork_cli", "predict", str(image), "--bundle", str(bundle)]
    command += ["--format", "jsonl"]
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "ROADWORK_PREDICT__WORKERS": "0"})
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"wall_s": round(min(walls), 2), "cpu_s": round(min(cpus), 2)}


def startup_seconds(bundle: Path, image: Path, repeats: int = 3) -> float:
    """Best wall time of ``roadwork predict IMAGE --bundle B`` as a fresh process (imports + load + one image)."""
    return startup_times(bundle, image, repeats)["wall_s"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved measurement rounds (medians reported).")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the main process.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the results JSON here.")
    parser.add_argument(
        "--onnx-out", type=Path, default=None, help="Compare the ONNX and eager runtimes instead; write JSON here."
    )
    args = parser.parse_args(argv)

    import torch

    if args.onnx_out:
        with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
            results = onnx_vs_eager(Path(tmp), args.images, args.batch_size, args.workers, args.rounds, args.backbone)
        text = json.dumps(results, indent=2)
        print(text)
        args.onnx_out.parent.mkdir(parents=True, exist_ok=True)
        args.onnx_out.write_text(text + "\n")
        return results

    from roadwork_cli.export import export_bundle
    from roadwork_cli.stage1 import Stage1Model

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        paths = make_jpegs(tmp / "images", args.images)
        run = make_run(tmp / "run", args.backbone)
        model = Stage1Model.from_run(run, device="cpu")
        batches = max(2, args.images // args.batch_size)
        # Interleaved rounds, medians: on a shared machine the load drifts; alternating keeps the ratio fair.
        bares, fasts = [], []
        for _ in range(args.rounds):
            bares.append(bare_forward(model, args.batch_size, batches))
            fasts.append(predict_path(model, paths, args.batch_size, args.workers, jpeg_draft=True))
        bare, fast = float(np.median(bares)), float(np.median(fasts))
        ratios = [f / b for f, b in zip(fasts, bares, strict=True)]
        hd = make_jpegs(tmp / "hd", 16, size=(1280, 720), seed=1)
        decode = {
            "640x480": decode_ms(model, paths[:16]),
            "1280x720": decode_ms(model, hd),
        }
        from roadwork_cli.config import Settings

        bundle = export_bundle(run, settings=Settings(export={"onnx": False}))  # the eager path's start-up
        startup = startup_seconds(bundle, paths[0])
        results = {
            "backbone": args.backbone,
            "images": args.images,
            "image_size": "640x480 JPEG q90",
            "batch_size": args.batch_size,
            "workers": args.workers,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "bare_forward_img_s": round(bare, 1),
            "predict_img_s": round(fast, 1),
            "ratio_predict_to_bare": round(fast / bare, 3),
            "ratio_per_round": [round(r, 3) for r in ratios],
            "ratio_median_of_rounds": round(float(np.median(ratios)), 3),
            "decode_transform_ms_per_image": decode,
            "predict_startup_one_image_s": round(startup, 2),
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
