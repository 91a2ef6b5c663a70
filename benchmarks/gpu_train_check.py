"""GPU check of ``train --mode train``: a ViT-S/16 DINOv3-shaped backbone (random weights) with DoRAN in bf16 on CUDA.

No downloads: the backbone is timm's ``vit_small_patch16_dinov3`` built with random weights, saved to a local
safetensors file and passed as ``model.weights``; the images are random noisy JPEGs whose dominant colour is the
label. A few hundred optimiser steps (``--images / --batch-size`` per epoch, times ``--epochs``) run through the real
loop: DataLoader workers with the moderate augmentation, autocast bf16, F-SAM, EMA, selection on val_select, merged
best checkpoints and the score files. Printed: images/s of the training epochs (after the first, which includes
worker start-up) and of the whole run, peak GPU memory, and the checks that the run used CUDA + bf16 and that the
merged model's recorded precision is bf16. Runs in well under 3 minutes on one H100 with 16 CPU cores.

Usage:
    python benchmarks/gpu_train_check.py [--images 2048] [--batch-size 64] [--epochs 8] [--workers 12]
    python benchmarks/gpu_train_check.py --device cpu --images 64 --batch-size 16 --epochs 2 --image-size 64  # smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_data import tinted_noise, write_jpegs, write_splits

BACKBONE = "vit_small_patch16_dinov3"


def write_images(folder: Path, n: int, side: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` random JPEGs (``side`` px) whose red or blue channel is lifted by the label, written in parallel."""

    def render(k: int) -> tuple:
        return tinted_noise(np.random.default_rng(seed * 1_000_003 + k), side, k % 2)  # one generator per image

    paths = write_jpegs(folder, n, render, name="{:06d}.jpg", threads=8)
    return [(str(path), k % 2) for k, path in enumerate(paths)]


def write_run(root: Path, samples: list[tuple[str, int]], n_train: int) -> Path:
    """splits.json by hand: the first ``n_train`` images train, the rest shared by val_select / val_calib / test."""
    ids = [f"{k:064x}" for k in range(len(samples))]
    rest = len(ids) - n_train
    cuts = [n_train, n_train + rest // 2, n_train + 3 * rest // 4, len(ids)]
    names = ("train", "val_select", "val_calib", "test")
    splits = {name: ids[a:b] for name, a, b in zip(names, [0, *cuts[:-1]], cuts, strict=True)}
    table = {
        i: {"path": p, "label": y, "source": "gpu_check", "group": i} for i, (p, y) in zip(ids, samples, strict=True)
    }
    root.mkdir(parents=True, exist_ok=True)
    write_splits(root / "splits.json", splits, table)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--images", type=int, default=2048, help="training images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--method", default="doran")
    parser.add_argument("--optimizer", default="fsam")
    args = parser.parse_args()

    import timm
    from safetensors.torch import save_file

    from roadwork_cli.config import load_settings
    from roadwork_cli.io.atomic import read_json
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.training.api import train

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a smoke run")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="roadwork-gpu-check-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = timm.create_model(BACKBONE, pretrained=False, num_classes=0, img_size=args.image_size)
        weights = root / "vit_small_dinov3_random.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model
        n_eval = max(64, args.images // 8)
        samples = write_images(root / "images", args.images + n_eval, side=args.image_size + 32)
        run = RunDir(write_run(root / "run", samples, args.images))
        settings = load_settings(
            None,
            {
                "data": {"augment": "moderate"},
                "model": {
                    "backbone": f"timm:{BACKBONE}",
                    "weights": str(weights),
                    "image_size": args.image_size,
                    "peft": {"method": args.method, "rank": 16},
                },
                "features": {"workers": args.workers, "batch_size": 2 * args.batch_size},
                "train": {
                    "mode": "train",
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "lr": 5e-4,
                    "warmup_epochs": 1,
                    "optimizer": args.optimizer,
                    "grad_clip": 1.0,
                },
                "runtime": {"run": str(run.root), "device": args.device, "precision": args.precision},
            },
            environ={},
        )
        prepared = time.perf_counter()
        ends: list[float] = []
        summary = train(run, settings, progress=True, on_epoch_end=lambda *_: ends.append(time.perf_counter()))
        durations = np.diff([prepared, *ends])
        steady = durations[1:] if len(durations) > 1 else durations
        info = read_json(run.checkpoints / "best.json")
        steps = args.epochs * -(-args.images // args.batch_size)
        result = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "backbone": f"timm:{BACKBONE} (random weights, {args.image_size} px)",
            "adapters": info.get("adapters", {}).get("method"),
            "optimizer": args.optimizer,
            "compute_precision": info["recipe"]["compute_precision"],
            "optimizer_steps": steps,
            "train_images_per_s_steady": float(args.images / steady.mean()),
            "train_images_per_s_overall": float(args.images * args.epochs / (ends[-1] - prepared)),
            "epoch_seconds": [round(float(d), 2) for d in durations],
            "train_call_seconds": round(summary.seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "best_epoch": summary.best_epoch,
            "val_select": summary.best_metrics,
            "peak_gpu_memory_gib": (
                round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device.startswith("cuda") else None
            ),
        }
        print(json.dumps(result, indent=2))
        assert info["recipe"]["compute_precision"] == args.precision, info["recipe"]
        assert (
            info["adapters"]["method"] == args.method and info["fingerprint"] == info["adapters"]["merged_fingerprint"]
        )


if __name__ == "__main__":
    main()
