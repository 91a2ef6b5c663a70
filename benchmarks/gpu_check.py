"""One GPU check: live training, the GPU decode path, DDP and bf16 decisions, measured in one run, written as JSON.

On a GPU host (no downloads; a ViT-S/16 DINOv3-shaped backbone with random weights, timm's
``vit_small_patch16_dinov3``) it runs in a few minutes and writes ``--out``:

* ``train``: the live loop of ``train --mode train`` (DataLoader workers decoding and augmenting JPEGs, DoRAN
  adapters, F-SAM, EMA, bf16 autocast; the epoch function the CLI runs) against a bare forward + backward of the same
  adapted model on a fixed on-device batch with plain AdamW (no data loading), in images/s; ``ratio`` is live / bare
  (goal >= 0.6, issue 22). ``ratio_vs_bare_two_pass`` compares with a bare step that also runs F-SAM's second pass,
  i.e. the same arithmetic: what is left is what the host costs. ``compiled``: the loop again with
  ``model.compile_backbone`` (skip with ``--no-compile``).
* ``profile``: ``torch.profiler`` over a few live steps: the host ops with the most self CPU time (and GPU time where
  there is a GPU), to name what keeps the loop host-bound.
* ``decode``: ``data.decoder: cuda`` (nvjpeg batches) against the PIL path on 4032x3024 phone-sized JPEGs and smaller
  ones: pixel equality within ``CUDA_DECODE_TOLERANCE``; then the predict loop (decode path -> model input ->
  backbone forward) on 4032x3024 JPEGs with each decoder, against the bare forward of the same batches (goal >= 0.85).
* ``ddp``: ``benchmarks/ddp_smoke.py`` under torchrun: NCCL at world size = the GPU count (>= 2), else 1.
* ``bf16``: decisions (cls at 0.5 and acceptance at the fp32 gate's 80 % quantile) of the trained model under bf16
  autocast against fp32 on held-out images: agreement rate and the largest probability change.

``--dry-run`` runs every section on the CPU with a tiny DINOv3-shaped backbone and a few small images (about a minute),
and writes the same keys (tests/test_gpu_check.py runs it). A section that fails records ``{"error": ...}`` and the
others still run; the exit status is 1 then.

Usage:
    python benchmarks/gpu_check.py --out gpu.json
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_train_check import BACKBONE, write_images, write_run  # noqa: E402

SECTIONS = ("train", "profile", "decode", "ddp", "bf16")
TRAIN_GOAL, PREDICT_GOAL = 0.6, 0.85


@dataclass
class Plan:
    """Sizes of one check: the full GPU run or the CPU dry run."""

    device: str
    backbone: str
    image_size: int
    train_images: int
    eval_images: int
    batch_size: int
    epochs: int
    workers: int
    bare_steps: int
    profile_steps: int
    large_images: int
    large_size: tuple[int, int]
    predict_batch: int
    ddp_steps: int
    compile: bool

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        cores = os.cpu_count() or 2
        if args.dry_run:
            return cls("cpu", "tiny_dinov3", 64, 32, 16, 8, 2, 0, 3, 2, 2, (403, 302), 2, 3, False)
        return cls(
            args.device, f"timm:{BACKBONE}", 224, args.images, max(128, args.images // 8), args.batch_size,
            args.epochs, min(args.workers, cores), 30, 6, 128, (4032, 3024), 32, 20, not args.no_compile,
        )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------ train run


def _settings(
    plan: Plan,
    run_root: Path,
    weights: Path | None,
    optimizer: str = "fsam",
    ema: float = 0.999,
    compiled: bool = False,
):
    from roadwork_cli.config import load_settings

    model: dict[str, Any] = {"backbone": plan.backbone, "image_size": plan.image_size, "compile_backbone": compiled}
    model["peft"] = {"method": "doran", "rank": 16}
    if weights is not None:
        model["weights"] = str(weights)
    return load_settings(
        None,
        {
            "data": {"augment": "moderate"},
            "model": model,
            "features": {"workers": plan.workers, "batch_size": plan.batch_size},
            "train": {
                "mode": "train",
                "epochs": plan.epochs,
                "batch_size": plan.batch_size,
                "min_steps_per_epoch": 1,
                "lr": 5e-4,
                "warmup_epochs": 1,
                "optimizer": optimizer,
                "grad_clip": 1.0,
                "ema_decay": ema,
            },
            "runtime": {"run": str(run_root), "device": plan.device, "precision": "bf16"},
        },
        environ={},
    )


@dataclass
class Prepared:
    plan: Plan
    root: Path
    weights: Path | None
    run: Any
    images: Any


def prepare(plan: Plan, root: Path) -> Prepared:
    """Random-weight backbone file (full run), JPEGs and a run with splits.json."""
    from roadwork_cli.features.cache import read_split_table
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.training.live_step import LiveImages

    weights = None
    if plan.backbone.startswith("timm:"):
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model(BACKBONE, pretrained=False, num_classes=0, img_size=plan.image_size)
        weights = root / "vit_small_dinov3_random.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    samples = write_images(root / "images", plan.train_images + plan.eval_images, side=plan.image_size + 32)
    run = RunDir(write_run(root / "run", samples, plan.train_images))
    return Prepared(plan, root, weights, run, LiveImages(read_split_table(run), {}))


def _setup(prepared: Prepared, optimizer: str = "fsam", ema: float = 0.999, compiled: bool = False):
    from roadwork_cli.training import finetune

    plan = prepared.plan
    settings = _settings(plan, prepared.run.root, prepared.weights, optimizer, ema, compiled)
    n_train = len(prepared.images.ids("train"))
    return finetune._setup(settings, torch.device(plan.device), n_train, None)


def _live_epochs(setup: Any, images: Any, epochs: int) -> list[float]:
    """Seconds of each epoch of the live loop (training pass only: no validation, no checkpoint writing)."""
    from roadwork_cli.training.live_step import train_live_epoch

    seconds = []
    for epoch in range(epochs):
        _sync(setup.device)
        started = time.perf_counter()
        train_live_epoch(setup, images, epoch, lambda *_, **__: None)
        _sync(setup.device)
        seconds.append(time.perf_counter() - started)
    return seconds


def _bare_steps(setup: Any, steps: int, two_pass: bool) -> float:
    """Images/s of forward + backward (+ AdamW) of the adapted model on one on-device batch; no data loading."""
    from roadwork_cli.runtime.device import autocast
    from roadwork_cli.training.losses import selective_loss

    ts, model, device = setup.settings.train, setup.model, setup.device
    size = model.backbone.preprocessing.size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(setup.batch_size, 3, size, size, generator=generator).to(device)
    if setup.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (setup.batch_size,), generator=generator).float().to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def one() -> None:
        with autocast(device, setup.dtype):
            output = model(x)
        loss, _ = selective_loss(type(output)(*(t.float() for t in output)), labels, ts.loss, ts.target_coverage)
        loss.backward()

    started = 0.0
    for step in range(steps + 2):  # two warm-up steps (cuDNN / allocator)
        if step == 2:
            _sync(device)
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        one()
        if two_pass:
            one()
        optimizer.step()
    _sync(device)
    return steps * setup.batch_size / (time.perf_counter() - started)


def section_train(prepared: Prepared, state: dict[str, Any]) -> dict[str, Any]:
    plan = prepared.plan
    setup = _setup(prepared)
    state["setup"] = setup
    seconds = _live_epochs(setup, prepared.images, plan.epochs)
    n_train = len(prepared.images.ids("train"))
    steady = seconds[1:] if len(seconds) > 1 else seconds  # epoch 0 pays for cuDNN autotuning and allocator growth
    live = n_train / float(np.mean(steady))
    bare_setup = _setup(prepared, optimizer="adamw", ema=0.0)
    bare = _bare_steps(bare_setup, plan.bare_steps, two_pass=False)
    bare_two = _bare_steps(bare_setup, plan.bare_steps, two_pass=True)
    if setup.device.type == "cuda":
        peak = round(torch.cuda.max_memory_allocated(setup.device) / 2**30, 2)
    else:
        peak = None
    compiled: dict[str, Any] = {"skipped": "dry run: compiling takes minutes on a CPU"}
    if plan.compile:  # model.compile_backbone: the same loop with the backbone's training forward compiled
        try:
            compiled_seconds = _live_epochs(_setup(prepared, compiled=True), prepared.images, plan.epochs)
            rate = n_train / float(np.mean(compiled_seconds[1:] or compiled_seconds))
            compiled = {
                "epoch_seconds": [round(s, 3) for s in compiled_seconds],  # the first includes compiling
                "live_images_per_s": round(rate, 2),
                "ratio": round(rate / bare, 4),
            }
        except Exception as exc:  # noqa: BLE001 - a compile failure is a finding, not the end of the check
            compiled = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {
        "backbone": f"{plan.backbone} (random weights, {plan.image_size} px)",
        "adapters": "doran",
        "optimizer": "fsam",
        "precision": str(setup.dtype).replace("torch.", "") if setup.dtype is not None else "fp32",
        "batch_size": setup.batch_size,
        "train_images": n_train,
        "workers": plan.workers,
        "epoch_seconds": [round(s, 3) for s in seconds],
        "live_images_per_s": round(live, 2),
        "bare_images_per_s": round(bare, 2),
        "bare_two_pass_images_per_s": round(bare_two, 2),
        "ratio": round(live / bare, 4),
        "ratio_vs_bare_two_pass": round(live / bare_two, 4),
        "goal": TRAIN_GOAL,
        "meets_goal": bool(live / bare >= TRAIN_GOAL),
        "peak_gpu_memory_gib": peak,
        "compiled": compiled,
    }


def section_profile(prepared: Prepared, state: dict[str, Any]) -> dict[str, Any]:
    """torch.profiler over a short live epoch (``profile_steps`` optimiser steps)."""
    from torch.profiler import ProfilerActivity, profile

    from roadwork_cli.training.live_step import LiveImages, train_live_epoch

    plan = prepared.plan
    setup = state.get("setup") or _setup(prepared)
    ids = prepared.images.ids("train")[: plan.profile_steps * setup.batch_size]
    table = prepared.images.table
    subset = LiveImages(type(table)(**{**table.__dict__, "splits": {**table.splits, "train": ids}}), {})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    train_live_epoch(setup, subset, 0, lambda *_, **__: None)  # warm: the profile shows the steady state
    with profile(activities=activities) as prof:
        _sync(setup.device)
        started = time.perf_counter()
        train_live_epoch(setup, subset, 1, lambda *_, **__: None)
        _sync(setup.device)
        wall = time.perf_counter() - started
    averages = prof.key_averages()
    cuda = setup.device.type == "cuda"

    def row(event: Any) -> dict[str, Any]:
        out = {"name": event.key, "calls": int(event.count), "self_cpu_ms": round(event.self_cpu_time_total / 1e3, 3)}
        if cuda:
            out["self_device_ms"] = round(getattr(event, "self_device_time_total", 0.0) / 1e3, 3)
        return out

    by_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    top_device = []
    if cuda:
        top_device = [row(e) for e in sorted(averages, key=lambda e: getattr(e, "self_device_time_total", 0.0))[::-1]]
    device_busy_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e3 if cuda else None
    syncs = [row(e) for e in averages if any(s in e.key for s in ("item", "_local_scalar_dense", "Synchronize"))]
    return {
        "steps": -(-len(ids) // setup.batch_size),
        "wall_ms": round(wall * 1e3, 1),
        "device_busy_ms": round(device_busy_ms, 1) if device_busy_ms is not None else None,
        "top_host_ops": [row(e) for e in by_cpu[:15]],
        "top_device_ops": top_device[:10],
        "host_syncs": syncs,
    }


# ------------------------------------------------------------------------------------------------------- decoding


def _large_jpegs(plan: Plan, n_distinct: int = 8) -> list[bytes]:
    """Phone-sized JPEGs (two of them EXIF-rotated), ``plan.large_images`` of them (a few distinct, repeated)."""
    from bench_data import photo_frame
    from PIL import Image

    def encode(k: int) -> bytes:
        image, quality = photo_frame(np.random.default_rng(k), plan.large_size)
        exif = Image.Exif()
        exif[0x0112] = (1, 6, 1, 3)[k % 4]
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
        return buffer.getvalue()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        distinct = list(pool.map(encode, range(min(n_distinct, plan.large_images))))
    return [distinct[k % len(distinct)] for k in range(plan.large_images)]


def _decode_device(plan: Plan) -> torch.device:
    return torch.device(plan.device) if plan.device.startswith("cuda") else torch.device("cpu")


def section_decode(prepared: Prepared, state: dict[str, Any]) -> dict[str, Any]:
    from roadwork_cli.data.decode import (
        CUDA_DECODE_TOLERANCE,
        DecodeRecipe,
        GpuDecodeLoader,
        ImageDataset,
        create_loader,
        to_model_input,
    )
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.runtime.device import autocast, compute_dtype

    plan = prepared.plan
    device = _decode_device(plan)
    backbone = create_backbone(plan.backbone, weights=prepared.weights, image_size=plan.image_size)
    backbone = backbone.to(device).to(memory_format=torch.channels_last).eval()
    large = _large_jpegs(plan)
    small = [Path(p).read_bytes() for p in prepared.images.paths(prepared.images.ids("test")[:8])]
    items = large[:8] + small

    # Equality: nvjpeg (torchvision's CPU decoder in the dry run) against the PIL path, per image.
    equality: dict[str, Any] = {
        "tolerance": CUDA_DECODE_TOLERANCE,
        "decoder": "nvjpeg" if device.type == "cuda" else "libjpeg (dry run)",
    }
    worst_mean = worst_p99 = 0.0
    for draft in (True, False):
        dataset = ImageDataset(items, DecodeRecipe(backbone.preprocessing, jpeg_draft=draft, decoder="cuda"))
        loader = GpuDecodeLoader(dataset, [range(len(items))], workers=max(plan.workers, 1), device=device)
        indices, pixels, failed = next(iter(loader))
        for k, i in enumerate(indices):
            diff = (pixels[k].cpu().int() - dataset[i][1].int()).abs().float()
            worst_mean = max(worst_mean, float(diff.mean()))
            worst_p99 = max(worst_p99, float(diff.flatten().quantile(0.99)))
        equality[f"failed_draft_{draft}"] = len(failed)
    equality.update(
        images=len(items),
        max_mean_abs=round(worst_mean, 3),
        max_p99_abs=round(worst_p99, 3),
        ok=bool(worst_mean <= CUDA_DECODE_TOLERANCE["mean_abs"] and worst_p99 <= CUDA_DECODE_TOLERANCE["p99_abs"]),
    )

    # Predict loop on the large JPEGs: decode path -> model input -> forward, per decoder, against the bare forward.
    dtype = compute_dtype(device, "bf16" if device.type == "cuda" else "fp32")
    batch = plan.predict_batch

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(device, dtype):
            backbone(x)

    def predict(decoder: str) -> float:
        dataset = ImageDataset(large, DecodeRecipe(backbone.preprocessing, decoder=decoder))
        if decoder == "cuda" and device.type != "cuda":  # the dry run: the same loader on the CPU decoder
            batches = [range(s, min(s + batch, len(large))) for s in range(0, len(large), batch)]
            loader = GpuDecodeLoader(dataset, batches, workers=max(plan.workers, 1), device=device)
        else:
            loader = create_loader(dataset, batch_size=batch, workers=plan.workers, pin_memory=device.type == "cuda")
        _sync(device)
        started = time.perf_counter()
        for _, pixels, _ in loader:
            forward(to_model_input(pixels, backbone.preprocessing, device))
        _sync(device)
        return len(large) / (time.perf_counter() - started)

    size = backbone.preprocessing.size
    x = torch.randn(batch, 3, size, size).to(device).contiguous(memory_format=torch.channels_last)
    forward(x)  # warm-up
    _sync(device)
    started = time.perf_counter()
    n_batches = -(-len(large) // batch)
    for _ in range(n_batches):
        forward(x)
    _sync(device)
    bare = n_batches * batch / (time.perf_counter() - started)
    predict("cuda")  # warm-up: nvjpeg handles, cuDNN plans
    rates = {"pil": predict("pil"), "cuda": predict("cuda")}
    return {
        "equality": equality,
        "predict": {
            "image_size": f"{plan.large_size[0]}x{plan.large_size[1]}",
            "images": len(large),
            "batch_size": batch,
            "workers": plan.workers,
            "bare_forward_images_per_s": round(bare, 2),
            "pil_images_per_s": round(rates["pil"], 2),
            "cuda_images_per_s": round(rates["cuda"], 2),
            "ratio_pil": round(rates["pil"] / bare, 4),
            "ratio_cuda": round(rates["cuda"] / bare, 4),
            "goal": PREDICT_GOAL,
            "meets_goal": bool(max(rates.values()) / bare >= PREDICT_GOAL),
        },
    }


# ------------------------------------------------------------------------------------------------------------ DDP


def section_ddp(prepared: Prepared, state: dict[str, Any]) -> dict[str, Any]:
    plan = prepared.plan
    cuda = plan.device.startswith("cuda")
    world = torch.cuda.device_count() if cuda else 1
    world = world if world >= 2 else 1
    out = prepared.root / "ddp.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
        str(HERE / "ddp_smoke.py"), "--device", "cuda" if cuda else "cpu", "--steps", str(plan.ddp_steps),
        "--out", str(out),
    ]  # fmt: skip
    if not cuda:
        command += ["--batch-size", "64"]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    record = json.loads(out.read_text()) if out.exists() else {}
    return {
        "world_size": world,
        "backend": record.get("backend"),
        "ok": bool(done.returncode == 0 and record.get("ok")),
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "record": record,
        "stderr_tail": done.stderr[-1500:] if done.returncode else "",
    }


# ----------------------------------------------------------------------------------------------------------- bf16


def section_bf16(prepared: Prepared, state: dict[str, Any]) -> dict[str, Any]:
    """Decisions of the trained model (or a fresh one) under bf16 autocast vs fp32 on the held-out images."""
    from roadwork_cli.data.decode import ImageDataset, create_loader, to_model_input
    from roadwork_cli.runtime.device import autocast

    setup = state.get("setup") or _setup(prepared)
    model = setup.model.eval()
    device = setup.device
    ids = [i for split in ("val_select", "val_calib", "test") for i in prepared.images.ids(split)]
    dataset = ImageDataset(prepared.images.paths(ids), setup.recipe)
    outputs: dict[str, list[torch.Tensor]] = {"fp32": [], "bf16": []}
    for _, pixels, _ in create_loader(dataset, batch_size=setup.batch_size, workers=prepared.plan.workers):
        x = to_model_input(pixels, model.backbone.preprocessing, device, setup.channels_last)
        with torch.inference_mode():
            outputs["fp32"].append(torch.stack([t.float() for t in model(x)[:2]], 1).cpu())  # (B, 2) cls, gate
            with autocast(device, torch.bfloat16):
                outputs["bf16"].append(torch.stack([t.float() for t in model(x)[:2]], 1).cpu())
    fp32, bf16 = torch.cat(outputs["fp32"]).sigmoid(), torch.cat(outputs["bf16"]).sigmoid()  # (N, 2)
    threshold = torch.quantile(fp32[:, 1], 0.2)  # accept the 80 % the fp32 gate is surest of
    decide = lambda p: torch.stack([p[:, 0] >= 0.5, p[:, 1] >= threshold], 1)  # noqa: E731
    same = (decide(fp32) == decide(bf16)).all(1)
    return {
        "images": len(fp32),
        "decision": "cls at p >= 0.5 and accepted at the fp32 gate's 20 % quantile (80 % coverage)",
        "agreement": round(float(same.float().mean()), 4),
        "disagreements": int((~same).sum()),
        "max_abs_p_change": round(float((fp32 - bf16).abs().max()), 5),
        "trained": "setup" in state,
    }


# ------------------------------------------------------------------------------------------------------------ main


def run_check(plan: Plan, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every section's figures (or its error), with the host and the timings."""
    started = time.perf_counter()
    host: dict[str, Any] = {
        "device": plan.device,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_cores": os.cpu_count(),
    }
    if plan.device.startswith("cuda"):
        host["gpu"] = torch.cuda.get_device_name()
    result: dict[str, Any] = {"dry_run": plan.device == "cpu", "host": host, "plan": plan.__dict__ | {}}
    state: dict[str, Any] = {}
    functions = {
        "train": section_train,
        "profile": section_profile,
        "decode": section_decode,
        "ddp": section_ddp,
        "bf16": section_bf16,
    }
    with tempfile.TemporaryDirectory(prefix="roadwork-gpu-check-") as tmp:
        prepared = prepare(plan, Path(tmp))
        result["prepare_seconds"] = round(time.perf_counter() - started, 1)
        for name in sections:
            begun = time.perf_counter()
            try:
                result[name] = functions[name](prepared, state)
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others' figures
                result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            result[name]["section_seconds"] = round(time.perf_counter() - begun, 1)
            print(f"[gpu_check] {name}: {result[name]['section_seconds']} s", file=sys.stderr, flush=True)
    result["plan"]["large_size"] = list(plan.large_size)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument(
        "--dry-run", action="store_true", help="every section on the CPU at tiny sizes (about a minute)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=1024, help="training images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="live epochs (the first is warm-up)")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--no-compile", action="store_true", help="skip the model.compile_backbone measurement")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS)
    )
    args = parser.parse_args(argv)
    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.dry_run:
        torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):  # library chatter goes to stderr; stdout is the JSON
        result = run_check(Plan.for_args(args), sections)
    from roadwork_cli.io.atomic import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("profile",)}, indent=2, default=str))
    return 1 if any("error" in result.get(name, {}) for name in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
