"""The bare forward of a backbone on this CPU: best layout, fp32 vs bf16 vs ONNX, and the fraction of peak FLOP rate.

Measured in one process, on in-memory normalised tensors (no decode, no head):

1. layouts: contiguous vs channels-last at batch 1 / 32 / 64, fp32, all cores -> images/s; the best is "the bare
   forward" that end-to-end paths are compared against;
2. precision: the best layout again under bf16 autocast, and under onnxruntime when an exported ONNX path exists
   (otherwise a row marked "not measured");
3. FLOP rate: FLOPs per image counted with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs),
   against (a) the CPU's nominal fp32 peak from ``lscpu`` -- cores x GHz x FLOPs/cycle for its widest vector ISA,
   assuming 2 FMA pipes (AVX-512: 2 x 16 lanes x 2 = 64 FLOP/cycle/core; AVX2: 32) -- and (b) a large fp32 matmul as
   the practical ceiling of this machine and BLAS.

Usage:
    python benchmarks/bench_forward.py [--backbone efficientnet_lite0] [--seconds 2] [--out runs/bench/forward.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
"""``lscpu`` flags that decide which kernels oneDNN / BLAS can use (bf16 needs avx512_bf16 or amx_bf16)."""

BATCH_SIZES = (1, 8, 32, 64)


def lscpu() -> dict[str, str]:
    """``lscpu`` as a dict (empty where the tool is missing, e.g. macOS)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def cpu_ghz(info: dict[str, str]) -> float | None:
    """Nominal clock: lscpu's max MHz, else the first ``cpu MHz`` of /proc/cpuinfo (VMs often report only that)."""
    if info.get("CPU max MHz"):
        return float(info["CPU max MHz"]) / 1000
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1000
    except OSError:
        pass
    return None


def machine_details() -> dict:
    """CPU model, cores, speed-relevant flags, clock, torch version and threads, date and load at the start."""
    info = lscpu()
    flags = set(info.get("Flags", "").split())
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu_model": info.get("Model name", platform.processor() or platform.machine()),
        "vendor": info.get("Vendor ID", ""),
        "cpu_family": info.get("CPU family", ""),
        "cores": os.cpu_count(),
        "ghz": cpu_ghz(info),
        "flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "hypervisor": info.get("Hypervisor vendor", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_1_5_15": [round(x, 2) for x in load],
    }


def nominal_peak(machine: dict) -> tuple[float | None, str]:
    """fp32 FLOP/s from cores x GHz x FLOP/cycle, and the assumption it rests on, in words."""
    flags = set(machine["flags"])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = 2 * lanes * 2  # 2 FMA pipes x fp32 lanes x (multiply + add)
    isa = {16: "AVX-512", 8: "AVX2", 4: "SSE"}[lanes]
    assumption = f"{isa}: 2 FMA pipes x {lanes} fp32 lanes x 2 = {per_cycle} FLOP/cycle/core"
    if lanes == 16 and machine["vendor"] == "AuthenticAMD":
        # Zen 4 executes a 512-bit FMA as two 256-bit halves: its real ceiling is half the nominal one.
        assumption += " (nominal; AMD Zen 4 double-pumps 512-bit ops on 256-bit units, so 32 is its true figure)"
    if not machine["ghz"]:
        return None, assumption
    return machine["cores"] * machine["ghz"] * 1e9 * per_cycle, assumption


def matmul_ceiling(n: int = 2048, dtype: torch.dtype = torch.float32, seconds: float = 1.5) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul, best of repeated calls: what BLAS reaches on this machine now."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def flops_per_image(backbone: torch.nn.Module) -> int:
    """FLOPs of one forward at batch 1 (``FlopCounterMode``: convolutions and matmuls, multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = backbone.preprocessing.size
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        backbone(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


def images_per_second(
    backbone: torch.nn.Module,
    batch_size: int,
    channels_last: bool,
    dtype: torch.dtype | None = None,
    seconds: float = 2.0,
) -> float:
    """Images/s of ``backbone`` on one in-memory batch, repeated for about ``seconds`` after a warm-up.

    The model is converted to the layout here (and back by the next call), so one backbone serves every row.
    """
    from roadwork_cli.runtime.device import autocast

    size = backbone.preprocessing.size
    layout = torch.channels_last if channels_last else torch.contiguous_format
    backbone.to(memory_format=layout)
    x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=layout)  # (B, 3, S, S)
    cpu = torch.device("cpu")
    with torch.inference_mode(), autocast(cpu, dtype):
        backbone(x)  # warm-up: oneDNN primitive creation, allocator
        images, started = 0, time.perf_counter()
        while True:
            backbone(x)
            images += batch_size
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and images >= 2 * batch_size:
                return images / elapsed


def onnx_images_per_second(backbone_name: str, batch_size: int, seconds: float) -> tuple[float | None, str]:
    """ONNX Runtime images/s of the backbone, or ``None`` and why it was not measured."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "not measured: onnxruntime is not installed (roadwork-cli[onnx])"
    import numpy as np

    from roadwork_cli.export import onnx_backbone_session

    session, size = onnx_backbone_session(backbone_name)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
    session.run(None, {name: x})
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or images < 2 * batch_size:
        session.run(None, {name: x})
        images += batch_size
    return images / (time.perf_counter() - started), "onnxruntime, CPU execution provider"


def run(backbone_name: str = "efficientnet_lite0", seconds: float = 2.0) -> dict:
    """Every measurement of this module, as one JSON-ready dict (``best`` = the bare forward at its best layout)."""
    from roadwork_cli.model.backbones import create_backbone

    machine = machine_details()
    backbone = create_backbone(backbone_name).eval()
    layouts = []
    for channels_last in (False, True):
        for batch_size in BATCH_SIZES:
            rate = images_per_second(backbone, batch_size, channels_last, None, seconds)
            layouts.append({"channels_last": channels_last, "batch_size": batch_size, "img_s": round(rate, 1)})
    best = max(layouts, key=lambda row: row["img_s"])
    bf16 = images_per_second(backbone, best["batch_size"], best["channels_last"], torch.bfloat16, seconds)
    onnx, onnx_note = onnx_images_per_second(backbone_name, best["batch_size"], seconds)
    flops = flops_per_image(backbone)
    peak, assumption = nominal_peak(machine)
    ceiling = matmul_ceiling()
    ceiling_bf16 = matmul_ceiling(dtype=torch.bfloat16)
    achieved = flops * best["img_s"]
    return {
        "machine": machine,
        "backbone": backbone_name,
        "image_size": backbone.preprocessing.size,
        "layouts": layouts,
        "best": best,
        "precision": {
            "fp32": {"img_s": best["img_s"], "note": "eager"},
            "bf16": {"img_s": round(bf16, 1), "note": "eager, torch.autocast(cpu, bfloat16)"},
            "onnx": {"img_s": None if onnx is None else round(onnx, 1), "note": onnx_note},
        },
        "flops_per_image": flops,
        "achieved_flop_s": achieved,
        "nominal_peak_flop_s": peak,
        "nominal_peak_assumption": assumption,
        "matmul_ceiling_flop_s": ceiling,
        "matmul_ceiling_bf16_flop_s": ceiling_bf16,
        "fraction_of_nominal_peak": None if not peak else achieved / peak,
        "fraction_of_matmul_ceiling": achieved / ceiling,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--seconds", type=float, default=2.0, help="Measuring time per row.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the results JSON here.")
    args = parser.parse_args(argv)
    return print_results(run(args.backbone, args.seconds), args.out)


def print_results(results: dict, out: Path | None) -> dict:
    """Print a benchmark's results as JSON, and write them to ``out`` too when given (for write_results.py)."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
