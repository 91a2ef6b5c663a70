"""DDP smoke check on the runtime roadwork uses under torchrun: NCCL on CUDA, gloo on CPU.

Run it with torchrun's own launcher (one process per GPU; on a single GPU ``--nproc_per_node=1`` still joins an NCCL
process group, so the NCCL path is exercised)::

    torchrun --standalone --nproc_per_node=N --no-python -- .venv/bin/python benchmarks/ddp_smoke.py [--device cuda]
    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/ddp_smoke.py --device cpu

Every rank checks, and prints one JSON line (rank 0 also writes ``--out``):

1. it joined the job (backend, world size, its device);
2. the collectives roadwork uses (JSON all-gather, state broadcast) round-trip;
3. ``steps`` train_crc steps of the selective head through ``Distributed.forward`` (each rank its part of every batch,
   DDP averaging) against the same steps taken by this process alone on the whole batches (TF32 off, so only float
   summation order differs): the first step's gradients agree to 1e-4 of each tensor's largest entry, and the weights
   at the end to ``--tolerance``;
4. how long a data-parallel step takes next to a single-process one (``ms_per_step``; at this head size it measures
   the collectives, not compute).

The exit status is 0 when every check passes on this rank, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from roadwork_cli.config import load_settings
from roadwork_cli.model.head import SelectiveHead
from roadwork_cli.runtime.distributed import distributed_from_env
from roadwork_cli.training.losses import ConformalTarget, selective_loss


def _steps(model, forward, features, labels, settings, batch_size: int, steps: int) -> tuple[float, list]:
    """AdamW steps (``train.lr``) over seeded batches; returns seconds per step after the first (DDP builds its
    buckets there) and the first step's gradients."""
    ts = settings.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=ts.lr)
    conformal = ConformalTarget.from_settings(settings)
    started = time.perf_counter()
    for step in range(steps):
        if step == 1:
            if features.is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        rows = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(step))[:batch_size]
        loss, _ = selective_loss(forward(model, features[rows]), labels[rows], ts.loss, ts.target_coverage, conformal)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            first_gradients = [p.grad.detach().clone() for p in model.parameters()]
        optimizer.step()
    if features.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / max(steps - 1, 1), first_gradients


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (each rank uses GPU LOCAL_RANK)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=250, help="global batch (odd splits test the padding)")
    parser.add_argument("--dim", type=int, default=384, help="feature dimension (ViT-S/16 is 384)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="max abs weight diff after --steps",
    )
    parser.add_argument("--out", type=Path, default=None, help="rank 0 writes its JSON record here")
    args = parser.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist = distributed_from_env(args.device)
    device = torch.device("cuda", dist.local_rank) if dist.backend == "nccl" else torch.device("cpu")
    record: dict = {"rank": dist.rank, "process": dist.describe(), "backend": dist.backend, "device": str(device)}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)

    gathered = dist.all_gather_json({"rank": dist.rank})
    state = dist.broadcast_state({"w": torch.arange(5.0), "tag": "from rank 0"} if dist.is_main else None)
    record["collectives_ok"] = gathered == [{"rank": r} for r in range(dist.world_size)] and (
        state is not None and state["tag"] == "from rank 0" and torch.equal(state["w"], torch.arange(5.0))
    )

    settings = load_settings(None, {"train": {"mode": "train_crc"}}, environ={})
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (4096,), generator=generator).float()
    features = torch.randn(4096, args.dim, generator=generator) + 0.8 * (2 * labels[:, None] - 1)
    features, labels = features.to(device), labels.to(device)
    torch.manual_seed(0)
    head = SelectiveHead(args.dim, hidden=256, dropout=0.0).to(device)
    alone = copy.deepcopy(head)

    spread, spread_gradients = _steps(head, dist.forward, features, labels, settings, args.batch_size, args.steps)
    single, gradients = _steps(alone, lambda m, x: m(x), features, labels, settings, args.batch_size, args.steps)
    # Relative to each tensor's largest gradient: DDP's average must be the full-batch gradient up to rounding.
    gradient_diff = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(spread_gradients, gradients, strict=True)
    )
    diff = max(
        (a - b).abs().max().item() for a, b in zip(head.state_dict().values(), alone.state_dict().values(), strict=True)
    )
    record.update(
        first_step_gradient_rel_diff=gradient_diff,
        gradients_match=gradient_diff < 1e-4,
        max_abs_weight_diff=diff,
        weights_match=diff < args.tolerance,
        ms_per_step={"ddp": 1e3 * spread, "single_process": 1e3 * single},
        steps=args.steps,
        batch_size=args.batch_size,
        world_size=dist.world_size,
    )
    dist.barrier()
    ok = bool(record["collectives_ok"] and record["gradients_match"] and record["weights_match"] and dist.enabled)
    record["ok"] = ok
    print(json.dumps(record), flush=True)
    if dist.is_main and args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
