"""``roadwork train``: the one entry point of every training mode.

* ``train_cached`` / ``train_crc`` fit the head on the run's feature cache (:mod:`roadwork_cli.training.cached`);
* ``train`` fine-tunes backbone adapters and the head on live images (:mod:`roadwork_cli.training.finetune`).

Both write the same artifacts (:mod:`roadwork_cli.training.artifacts`) through one epoch skeleton
(:mod:`roadwork_cli.training.epochs`), so calibrate, evaluate, export and predict do not care which mode ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from roadwork_cli.config import Settings
from roadwork_cli.features.current import with_run_backbone
from roadwork_cli.io.atomic import atomic_write_text
from roadwork_cli.io.run import RunDir
from roadwork_cli.runtime.device import resolve_device
from roadwork_cli.runtime.distributed import distributed_from_env
from roadwork_cli.training.artifacts import TrainSummary
from roadwork_cli.training.cached import train_cached
from roadwork_cli.training.finetune import train_live

__all__ = ["TrainSummary", "train"]


@contextlib.contextmanager
def _threads(settings: Settings, device: torch.device) -> Iterator[None]:
    """Torch's CPU threads for the run, restored afterwards.

    The cached modes' matmuls are too small to amortise OpenMP barriers: on CPU one thread is about as fast on an
    idle machine and many times faster on a busy one (threads spinning at barriers). The live loop runs a backbone and
    keeps torch's default. ``runtime.threads`` overrides both.
    """
    previous = torch.get_num_threads()
    threads = settings.runtime.threads
    if threads is None and settings.train.mode != "train" and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(
    run: RunDir,
    settings: Settings,
    progress: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Train per ``settings.train.mode`` and write checkpoints, ``metrics.csv`` and ``scores/<split>.csv``.

    The backbone is the run's (that of its current features) unless the run has none yet; the settings actually used
    are written to ``config.yaml``.

    Args:
        run: Run directory with ``splits.json`` (and cached features for the cached modes).
        settings: Resolved :class:`~roadwork_cli.config.Settings`.
        progress: Show rich progress bars on stderr.
        on_epoch_end: Called as ``fn(epoch, metrics)`` after each epoch's checkpoints are on disk.

    Raises:
        UsageError: No splits; split images without cached features (cached modes); no training images; an explicit
            backbone other than the run's; unknown adapter targets; fp16 with SAM / F-SAM.
        StaleError: The inputs of ``cache-features`` changed since it ran (cached modes).
    """
    settings = with_run_backbone(run, settings, "`train`")
    if distributed_from_env(settings.runtime.device).is_main:
        run.ensure()
        atomic_write_text(run.config, settings.to_yaml())
    device = resolve_device(settings.runtime.device)
    with _threads(settings, device):
        if settings.train.mode == "train":
            return train_live(run, settings, device, progress, on_epoch_end)
        return train_cached(run, settings, device, progress, on_epoch_end)
