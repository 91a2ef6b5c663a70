"""CPU streams: run whole batches (decode + forward) on S threads at once, results in input order.

Why: on the CPU the JPEG decode and the forward share the cores. Decode workers that run *beside* a forward using
every core oversubscribe them: an intra-op thread that loses its core to a decoder stalls the others at the next
barrier, so end to end fell to 50-83 % of what the decode cost allows (benchmarks/RESULTS.md). A stream instead
decodes its batch (with its own ``threads`` decode threads) and then runs the forward (with ``threads`` intra-op
threads), one phase after the other, so it never asks for more cores than it owns; S streams of T threads use S x T
cores, and on a many-core host throughput grows with S instead of flattening on one forward's poor scaling.

Every stream runs the same batches a single stream would (the batch plan does not depend on S) with the same
number of intra-op threads, so results are equal whatever S is; :func:`ordered_map` hands them back in order.

Example:
    >>> plan = resolve_streams("auto", threads=None)  # doctest: +SKIP
    >>> for result in ordered_map(work, batches, plan.streams, init=plan.init_torch):  # doctest: +SKIP
    ...     consume(result)
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["StreamPlan", "cpu_cores", "local_pool", "ordered_map", "resolve_streams"]

T = TypeVar("T")
R = TypeVar("R")

THREADS_PER_STREAM = 2
"""Intra-op threads per stream that ``auto`` aims at: a small forward scales well up to 2 threads and poorly beyond,
so a many-core host runs cores / 2 streams (2 cores: one stream of 2 threads, today's numerics)."""

_local = threading.local()


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class StreamPlan:
    """How many streams run and with how many threads each.

    Attributes:
        streams: Batches in flight at once, each on its own thread.
        threads: Intra-op threads of each stream's forward, and decode threads of its decode phase.
    """

    streams: int
    threads: int

    def init_torch(self) -> None:
        """Stream-thread initialiser for PyTorch: this thread's intra-op threads (OpenMP's are per calling thread)."""
        import torch

        torch.set_num_threads(self.threads)


def resolve_streams(
    setting: int | str | None,
    threads: int | None = None,
    cores: int | None = None,
    per_stream: int = THREADS_PER_STREAM,
) -> StreamPlan:
    """The stream plan of a ``streams`` setting and ``runtime.threads``.

    Args:
        setting: A count >= 1, or ``auto`` / ``None``: ``cores // threads`` streams where ``threads`` is given, else
            ``cores // per_stream`` (at least one).
        threads: Intra-op threads per stream (``runtime.threads``); ``None``: the cores shared out over the streams.
        cores: Cores available (default :func:`cpu_cores`).
        per_stream: Threads per stream that ``auto`` aims at without ``threads``: :data:`THREADS_PER_STREAM` for
            PyTorch; 1 for onnxruntime, whose session of one thread has no pool spinning beside the decode.

    Raises:
        ValueError: ``setting`` is neither ``auto`` nor a positive count.
    """
    cores = cores or cpu_cores()
    if setting in (None, "auto"):
        streams = max(1, cores // (threads or per_stream))
    else:
        streams = int(setting)
        if streams < 1:
            raise ValueError(f"streams must be 'auto' or >= 1, got {setting!r}")
    return StreamPlan(streams=streams, threads=threads or max(1, cores // streams))


def local_pool() -> ThreadPoolExecutor | None:
    """The decode pool of the stream this thread runs (see ``decode_threads`` of :func:`ordered_map`), or None."""
    return getattr(_local, "pool", None)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    streams: int,
    init: Callable[[], Any] | None = None,
    ahead: int | None = None,
    decode_threads: int = 0,
) -> Iterator[R]:
    """``fn(item)`` for each item, computed by ``streams`` threads, yielded in the order of ``items``.

    At most ``ahead`` (default ``2 x streams``) items are in flight, so memory stays bounded by that many batches.
    Even one stream runs on a thread of its own, so a forward always runs where ``init`` set its threads. With
    ``decode_threads`` > 1 each stream thread gets a pool of that many threads of its own (:func:`local_pool`), for
    the decode phase of its batch. Leaving the iteration early (an interrupt, an error, ``break``) drops the queued
    items and waits for the running ones (each one batch) before returning.

    Raises:
        Exception: The first failing ``fn``'s exception, when its result is reached.
    """
    ahead = max(streams, ahead or 2 * streams)
    upcoming = iter(items)
    pending: deque[Future[R]] = deque()
    pools: list[ThreadPoolExecutor] = []
    lock = threading.Lock()

    def start() -> None:
        if init is not None:
            init()
        _local.pool = None
        if decode_threads > 1:
            _local.pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="roadwork-decode")
            with lock:
                pools.append(_local.pool)

    pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="roadwork-stream", initializer=start)
    try:
        for item in upcoming:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            item = next(upcoming, _END)
            if item is not _END:
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for decode_pool in pools:
            decode_pool.shutdown(wait=True)


_END = object()
