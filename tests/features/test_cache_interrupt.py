"""Interrupted ``cache-features``: Ctrl-C / SIGTERM keep the finished batches, and the resumed cache is byte-identical.

Issue 17 item 5: a run under ``shard_size`` images lost everything on Ctrl-C, although it said "re-run to resume".
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from cache_helpers import make_run, tiny_settings

from roadwork_cli.features.cache import cache_features
from roadwork_cli.io.run import RunDir
from roadwork_cli.model.backbones import create_backbone


@dataclass
class SequentialRank:
    """Rank ``rank`` of a torchrun job whose ranks run one after another in this process (rank 0 last, merging)."""

    rank: int
    world_size: int

    def barrier(self) -> None:
        pass

    def all_gather_json(self, value):
        return [value] * self.world_size


def _counting():
    """A tiny_vit that records the size of every forward pass."""
    backbone = create_backbone("tiny_vit")
    calls: list[int] = []
    backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return backbone, calls


def _interrupt_after(k: int, how: str = "ctrl-c"):
    """An ``on_batch`` hook that interrupts the run once ``k`` batches are done: Ctrl-C, or a real SIGTERM."""
    done: list[int] = []

    def hook(batch: int) -> None:
        done.append(batch)
        if len(done) == k:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, as it would mid-loop
            else:
                raise KeyboardInterrupt

    return hook


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a cache folder (sub-folders such as parts/ must be gone: checked separately)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted cache (default shard size: the whole run is one shard in flight, as in the field trial)."""
    run = make_run(tmp_path_factory.mktemp("clean"), bad=1)
    summary = cache_features(run, tiny_settings(run, views=1, shard_size=2048))
    batches = -(-summary.total // 4)  # batch_size 4; each batch has readable images
    return run, summary, batches


def _resume(run: RunDir, **settings):
    backbone, calls = _counting()
    summary = cache_features(run, tiny_settings(run, views=1, **settings), backbone=backbone)
    return summary, calls


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_under_one_shard_keeps_its_batches(reference, tmp_path, how):
    ref_run, ref, n_batches = reference
    run = make_run(tmp_path, bad=1)
    k = 3
    with pytest.raises(KeyboardInterrupt):
        cache_features(run, tiny_settings(run, views=1, shard_size=2048), on_batch=_interrupt_after(k, how))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is only installed while caching
    folder = run.features / ref.fingerprint
    assert list((folder / "parts").glob("*.pending.json"))  # the finished batches are on disk
    summary, calls = _resume(run, shard_size=2048)
    assert len(calls) == n_batches - k  # only the batches that were not finished are computed
    assert summary.computed == sum(calls) and summary.computed + summary.reused == ref.computed
    assert not (folder / "parts").exists()
    assert _folder_bytes(folder) == _folder_bytes(ref.folder)  # index, failures, meta and the shard, byte for byte


def test_two_interrupts_and_a_shard_finished_at_the_interrupt_resume_to_the_same_bytes(tmp_path):
    clean_run, run = make_run(tmp_path / "clean"), make_run(tmp_path / "run")
    clean = cache_features(clean_run, tiny_settings(clean_run, views=1))  # shard_size 8 = two batches of 4
    # The interrupt comes after batch 1, the last one of shard 0, before the shard is written; then again later.
    with pytest.raises(KeyboardInterrupt):
        cache_features(run, tiny_settings(run, views=1), on_batch=_interrupt_after(2))
    with pytest.raises(KeyboardInterrupt):
        cache_features(run, tiny_settings(run, views=1), on_batch=_interrupt_after(3))
    summary, calls = _resume(run)
    n_batches = -(-clean.total // 4)
    assert len(calls) == n_batches - 5
    assert summary.computed == sum(calls) and summary.reused == clean.total - sum(calls)
    assert _folder_bytes(run.features / clean.fingerprint) == _folder_bytes(clean.folder)


def test_pending_batches_of_another_augmentation_are_not_taken(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache_features(run, tiny_settings(run, views=1, shard_size=2048), on_batch=_interrupt_after(4))
    other = tiny_settings(run, views=1, shard_size=2048)
    other.data.augment = "aggressive"  # the augmented views are other pixels: pending rows of them are stale
    backbone, calls = _counting()
    summary = cache_features(run, other, backbone=backbone)
    assert summary.reused == 0 and summary.computed == sum(calls) == summary.total


def test_an_interrupted_torchrun_rank_keeps_its_batches_and_the_merge_is_byte_identical(tmp_path):
    clean_run, run = make_run(tmp_path / "clean"), make_run(tmp_path / "run")
    clean = cache_features(clean_run, tiny_settings(clean_run, views=1, shard_size=2048))
    n_batches = -(-clean.total // 4)
    with pytest.raises(KeyboardInterrupt):  # rank 1 (batches 1, 3, 5, ...) stops after two of them
        cache_features(
            run, tiny_settings(run, views=1, shard_size=2048), dist=SequentialRank(1, 2), on_batch=_interrupt_after(2)
        )
    backbone, calls = _counting()
    cache_features(run, tiny_settings(run, views=1, shard_size=2048), backbone=backbone, dist=SequentialRank(1, 2))
    assert len(calls) == n_batches // 2 - 2
    cache_features(run, tiny_settings(run, views=1, shard_size=2048), dist=SequentialRank(0, 2))
    folder = run.features / clean.fingerprint
    assert not (folder / "parts").exists()
    assert _folder_bytes(folder) == _folder_bytes(clean.folder)


_KILLED_RUN = """
import os, signal, sys
import roadwork_cli.features.cache as cache
from roadwork_cli.config import load_settings
from roadwork_cli.io.run import RunDir

cache.PENDING_EVERY_S = 0.0  # keep every finished batch at once (the default is a minute)
run = RunDir(sys.argv[1])
overrides = {
    "runtime": {"run": str(run.root), "device": "cpu"},
    "model": {"backbone": "tiny_vit"},
    "features": {"workers": 0, "batch_size": 4, "shard_size": 2048, "views": 1},
}
done = []

def kill(batch):
    done.append(batch)
    if len(done) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no flush: what the OOM killer does

cache.cache_features(run, load_settings(None, overrides, environ={}), on_batch=kill)
"""


def test_a_sigkill_mid_shard_loses_only_the_batch_in_flight(reference, tmp_path):
    import subprocess
    import sys

    _, ref, n_batches = reference
    run = make_run(tmp_path, bad=1)
    k = 4
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(run.root), str(k)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    summary, calls = _resume(run, shard_size=2048)
    assert len(calls) == n_batches - (k - 1)  # batches 1..k-1 were kept as they finished; the k-th is recomputed
    assert _folder_bytes(run.features / ref.fingerprint) == _folder_bytes(ref.folder)
