"""PyTorch's own distributed runtime for ``cache-features`` and ``train``, as launched by ``torchrun``.

torchrun starts one process per rank and tells each its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`distributed_from_env` reads it and joins the default
process group: NCCL when the work runs on CUDA (each rank on GPU ``LOCAL_RANK``), gloo on CPU. Without torchrun, or
with one process, it returns :data:`SINGLE_PROCESS`, whose collectives do nothing, so library code calls the same
methods either way.

The launch form (docs/architecture.md, "Scale")::

    torchrun --nproc_per_node=N [--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB] \\
        --no-python -- roadwork cache-features|train --run DIR ...

The ``--`` ends torchrun's own options: without it, torchrun's parser takes roadwork's ``--run`` for an abbreviation of
its ``--run-path`` and stops before roadwork starts.

Only tensors and bytes travel between ranks: JSON for small records, ``torch.save`` bytes read back with
``weights_only=True`` for training state. Nothing is unpickled.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec

import torch
import torch.distributed as dist

from roadwork_cli.errors import UsageError

__all__ = [
    "SINGLE_PROCESS",
    "Distributed",
    "current_distributed",
    "distributed_from_env",
    "main_process_only",
    "rank_slice",
]

P = ParamSpec("P")

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """The contiguous part of ``n`` ordered items that ``rank`` handles: ``ceil(n / world_size)`` items, fewer at the
    end (possibly none), so that the parts of ranks 0..W-1 concatenate back to the original order."""
    per_rank = -(-n // world_size)
    return slice(min(rank * per_rank, n), min((rank + 1) * per_rank, n))


def _all_gather_single(output: torch.Tensor, block: torch.Tensor) -> None:
    """Equal-sized blocks of every rank into ``output``, in rank order (the newer name where torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, block)


class _GatherRows(torch.autograd.Function):
    """All-gather equal-sized ``(m, ...)`` blocks into ``(W * m, ...)`` in rank order, with a gradient.

    Every rank computes the same loss from the gathered tensor, so the gradient of its own block is the same on every
    rank; the all-gather's usual backward (a sum over ranks) is therefore ``W`` times the local slice, which DDP's
    average over ranks turns back into exactly the full-batch gradient.
    """

    @staticmethod
    def forward(ctx, block: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:  # type: ignore[override]

        ctx.rank, ctx.world_size, ctx.rows = rank, world_size, block.shape[0]
        gathered = block.new_empty((world_size * block.shape[0], *block.shape[1:]))
        _all_gather_single(gathered, block.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows] * ctx.world_size, None, None


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job, and the few collectives roadwork needs.

    Attributes:
        rank: Global rank (0 = the main process, which writes the shared artifacts).
        world_size: Number of processes in the job.
        local_rank: Rank on this node (its GPU under NCCL).
        backend: ``"nccl"``, ``"gloo"``, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    _wrapped: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def enabled(self) -> bool:
        """Whether this process is in a process group (torchrun started it), even as its only member."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """One line for the log, e.g. ``world size 2 (gloo, rank 0)``."""
        if not self.enabled:
            return "world size 1 (single process)"
        return f"world size {self.world_size} ({self.backend}, rank {self.rank})"

    @property
    def _comm_device(self) -> torch.device:
        """Where collective buffers live: NCCL only moves CUDA tensors."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (writing a shared file, say), then the other ranks run it (and find it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order."""
        if not self.enabled:
            return [payload]

        device = self._comm_device
        sizes = self.row_counts(len(payload))
        longest = max(sizes)
        block = torch.zeros(longest, dtype=torch.uint8, device=device)
        block[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else block[:0]
        blocks = torch.empty(self.world_size * longest, dtype=torch.uint8, device=device)
        _all_gather_single(blocks, block)
        blocks = blocks.cpu().view(self.world_size, longest)
        return [bytes(blocks[r, : int(sizes[r])].tolist()) for r in range(self.world_size)]

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank's JSON-serialisable ``value``, in rank order (small records: counts, fingerprints)."""
        return [json.loads(b) for b in self.all_gather_bytes(json.dumps(value).encode())]

    def broadcast_state(self, state: dict[str, Any] | None, src: int = 0) -> dict[str, Any] | None:
        """Rank ``src``'s ``state`` (tensors, numbers, strings, lists, dicts, or None) on every rank.

        It travels as ``torch.save`` bytes read back with ``weights_only=True``: a resumed training state reaches
        ranks on nodes that cannot read rank 0's checkpoint file.
        """
        if not self.enabled:
            return state
        buffer = io.BytesIO()
        if self.rank == src:
            torch.save(state, buffer)
        payload = buffer.getvalue()
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self._comm_device)
        dist.broadcast(size, src)
        data = torch.zeros(int(size.item()), dtype=torch.uint8, device=self._comm_device)
        if self.rank == src:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(data, src)
        if self.rank == src:
            return state
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in ``DistributedDataParallel`` (one wrapper per module, made on first use); itself when alone.

        DDP averages the parameters' gradients over ranks during ``backward`` and starts every rank from rank 0's
        weights.
        """
        if not self.enabled:
            return module
        known = self._wrapped.get(id(module))
        if known is not None and known[0] is module:
            return known[1]
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.backend == "nccl" else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids)
        self._wrapped[id(module)] = (module, wrapped)
        return wrapped

    def part(self, n: int) -> slice:
        """This rank's :func:`rank_slice` of a global batch of ``n`` items (all of it in one process): what a
        live-image loop decodes and runs through :meth:`wrap`'s model before :meth:`gather`."""
        return rank_slice(n, self.rank, self.world_size)

    def row_counts(self, rows: int) -> list[int]:
        """Every rank's ``rows``, in rank order."""
        if not self.enabled:
            return [rows]
        counts = torch.empty(self.world_size, dtype=torch.int64, device=self._comm_device)
        _all_gather_single(counts, torch.tensor([rows], dtype=torch.int64, device=self._comm_device))
        return [int(c) for c in counts.tolist()]

    def gather(self, output: Any, counts: list[int] | None = None) -> Any:
        """This rank's rows of a global batch -> the rows of every rank, in rank order, on every rank, with gradients
        flowing back to each rank's own rows.

        ``output`` is a tensor or a (named) tuple, list or dict of ``(b_r, ...)`` tensors; ranks may hold different
        numbers of rows (a live-image batch whose images failed to decode on one rank), none included. A loss of the
        result is the single-process loss of the batch (batch statistics such as the mean gate or the conformal
        thresholds included), and its gradient after DDP's average over ranks is the full-batch gradient: one process
        and N processes take the same steps, up to float summation order. Every rank must call it for every batch.

        Args:
            output: This rank's outputs (or labels: tensors without gradients are gathered the same way).
            counts: Every rank's row count when known (:meth:`row_counts`); asked of the ranks otherwise.
        """
        if not self.enabled:
            return output
        if counts is None:
            rows: list[int] = []  # of each tensor in output; they share the batch dimension
            _map_tensors(output, lambda value: rows.append(int(value.shape[0])) or value)
            counts = self.row_counts(rows[0] if rows else 0)
        per_rank = max(counts)

        def gather_rows(value: torch.Tensor) -> torch.Tensor:
            if value.shape[0] < per_rank:  # all-gather needs equal blocks; the padding rows are cut away below
                value = torch.cat([value, value.new_zeros((per_rank - value.shape[0], *value.shape[1:]))])
            full = _GatherRows.apply(value, self.rank, self.world_size)  # (W * per_rank, ...)
            return torch.cat(
                [full[r * per_rank : r * per_rank + k] for r, k in enumerate(counts)]
            )  # (sum(counts), ...)

        return _map_tensors(output, gather_rows)

    def forward(self, module: torch.nn.Module, batch: torch.Tensor) -> Any:
        """``module(batch)`` computed data-parallel when the whole batch is at hand on every rank (cached features).

        Each rank runs its :meth:`part` of ``batch`` through the DDP-wrapped ``module``, zero-padded to
        ``ceil(B / W)`` rows so that every rank draws the same amount of randomness (dropout), which lets rank 0's
        saved RNG state resume every rank; :meth:`gather` returns the outputs of the whole batch.

        Args:
            module: The model (unwrapped; see :meth:`wrap`).
            batch: ``(B, ...)`` the whole global batch, identical on every rank.
        """
        if not self.enabled:
            return module(batch)
        n = batch.shape[0]
        counts = [len(range(n)[rank_slice(n, r, self.world_size)]) for r in range(self.world_size)]
        block = batch[self.part(n)]  # (b_r, ...)
        if block.shape[0] < max(counts):
            block = torch.cat([block, block.new_zeros((max(counts) - block.shape[0], *block.shape[1:]))])
        own = counts[self.rank]
        return self.gather(_map_tensors(self.wrap(module)(block), lambda value: value[:own]), counts)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (tensors, (named) tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple, e.g. HeadOutput
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


SINGLE_PROCESS = Distributed()
"""The context of a process that torchrun did not start: rank 0 of 1, every collective a no-op."""

_joined: dict[str, Distributed] = {}


def current_distributed() -> Distributed:
    """The torchrun job this process joined with :func:`distributed_from_env`, else :data:`SINGLE_PROCESS`."""
    return _joined.get("job", SINGLE_PROCESS)


def main_process_only(write: Callable[P, None]) -> Callable[P, None]:
    """Make ``write`` (an artifact writer: checkpoints, metrics, scores) do nothing on ranks other than 0.

    Every rank holds the same weights after each DDP step, so one copy of each artifact is written, by rank 0.
    """

    @functools.wraps(write)
    def on_main(*args: P.args, **kwargs: P.kwargs) -> None:
        if current_distributed().is_main:
            write(*args, **kwargs)

    return on_main


def leave() -> None:
    """Leave the process group together with the other ranks (registered at exit; idempotent).

    A rank that tears down its gloo connections while a peer still uses them aborts that peer, so every rank first
    waits for the others; gloo's monitored barrier gives up after a minute if a peer is gone (its job failed anyway).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for, still release the group
        pass
    dist.destroy_process_group()


def distributed_from_env(device: str = "auto") -> Distributed:
    """Join the torchrun job this process belongs to, or return :data:`SINGLE_PROCESS`.

    A process that torchrun started joins its process group even alone (``--nproc_per_node=1``), so one GPU runs the
    NCCL path too. Idempotent: a second call returns the same context. The process group is left at interpreter exit.

    Args:
        device: ``runtime.device``; CUDA (``auto`` with a GPU, ``cuda``) selects NCCL and GPU ``LOCAL_RANK``,
            anything else gloo.

    Raises:
        UsageError: ``WORLD_SIZE`` > 1 without the rest of the torchrun environment.
    """
    if "job" in _joined:
        return _joined["job"]
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    missing = [name for name in _TORCHRUN_VARIABLES if not os.environ.get(name)]
    if world_size <= 1 and missing:  # not started by torchrun
        return SINGLE_PROCESS
    if missing:
        raise UsageError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start distributed work with torchrun, e.g. "
            "`torchrun --nproc_per_node=2 --no-python -- roadwork cache-features --run DIR` (the `--` keeps "
            "torchrun's parser off roadwork's flags), or unset WORLD_SIZE for one process."
        )
    from roadwork_cli.runtime.device import resolve_device

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = resolve_device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU everywhere in the library
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
        atexit.register(leave)
    context = Distributed(rank, world_size, local_rank, str(dist.get_backend()))
    _joined["job"] = context
    return context
