"""torchrun scale-out: the same cache and the same downstream report as one process.

The fast tests run the ranks of a job one after another in this process (collectives are trivial when a rank's
partners have already finished); the end-to-end test starts real gloo processes with ``python -m
torch.distributed.run ... --no-python -- roadwork ...``, exactly as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.config import load_settings
from roadwork_cli.features.cache import cache_features, load_cached
from roadwork_cli.io.run import RunDir
from roadwork_cli.runtime.distributed import SINGLE_PROCESS, Distributed, distributed_from_env, rank_slice

ROADWORK = Path(sys.executable).with_name("roadwork")


class Crash(Exception):
    pass


@dataclass
class SequentialRank:
    """Rank ``rank`` of a job whose ranks run one after another in this process, highest rank first.

    A later rank finds the earlier ranks' files on disk, which is all the barriers guarantee; every rank reports the
    same counts, so the summed counts are ``world_size`` times this rank's.
    """

    rank: int
    world_size: int

    def barrier(self) -> None:
        pass

    def all_gather_json(self, value):
        return [value] * self.world_size


def _split(run: Path, n: int = 40) -> RunDir:
    result = CliRunner().invoke(
        app, ["split", "--source", f"synthetic:{n}", "--run", str(run), "--fractions", "0.4,0.2,0.2,0.2"]
    )
    assert result.exit_code == 0, result.output
    return RunDir(run)


def _settings(run: RunDir, **features):
    overrides = {
        "runtime": {"run": str(run.root), "device": "cpu", "threads": 1},
        "model": {"backbone": "tiny_vit"},
        "features": {"workers": 0, "batch_size": 3, "shard_size": 7, "views": 1, **features},
    }
    return load_settings(None, overrides, environ={})


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[RunDir, Path]:
    """A split and its cache written by one process (the reference layout)."""
    run = _split(tmp_path_factory.mktemp("single") / "run")
    summary = cache_features(run, _settings(run))
    return run, summary.folder


def _copy_split(reference: RunDir, root: Path) -> RunDir:
    """The reference run without its features (image paths in splits.json stay valid: they are absolute)."""
    run = RunDir(root).ensure()
    shutil.copy(reference.splits, run.splits)
    return run


def test_rank_slices_cover_the_batch_in_order():
    for n in range(0, 12):
        for world in range(1, 5):
            parts = [range(n)[rank_slice(n, r, world)] for r in range(world)]
            assert [i for part in parts for i in part] == list(range(n))
            per = -(-n // world)  # ceil: every part but the last ones is full, which the padded gather relies on
            assert [len(p) for p in parts] == [max(0, min(per, n - r * per)) for r in range(world)]


def test_torchrun_needs_the_double_dash_before_roadwork_flags(capsys):
    from torch.distributed.run import parse_args

    roadwork = ["roadwork", "cache-features", "--run", "DIR", "--batch-size", "8"]
    with pytest.raises(SystemExit):  # without "--": torchrun takes --run for an abbreviation of its --run-path
        parse_args(["--nproc_per_node=2", "--no-python", *roadwork])
    assert "--run-path" in capsys.readouterr().err
    multi_node = ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=host0:29400", "--rdzv-id=job7"]
    for launcher in (["--nproc_per_node=2"], ["--nproc_per_node=4", *multi_node]):
        args = parse_args([*launcher, "--no-python", "--", *roadwork])
        assert [args.training_script, *args.training_script_args] == roadwork  # roadwork's argv, unchanged
        assert args.no_python and not args.run_path


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed_from_env("cpu") is SINGLE_PROCESS
    head = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    assert SINGLE_PROCESS.wrap(head) is head
    assert torch.equal(SINGLE_PROCESS.forward(head, x), head(x))
    assert SINGLE_PROCESS.all_gather_json({"a": 1}) == [{"a": 1}]
    state = {"w": torch.ones(2)}
    assert SINGLE_PROCESS.broadcast_state(state) is state
    assert SINGLE_PROCESS.describe() == "world size 1 (single process)"


def test_world_size_without_torchrun_is_a_usage_error(monkeypatch):
    from roadwork_cli.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="torchrun"):
        distributed_from_env("cpu")


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_merge_into_the_one_process_cache_byte_for_byte(one_process, tmp_path, world_size):
    reference, reference_folder = one_process
    run = _copy_split(reference, tmp_path / "run")
    summaries = [
        cache_features(run, _settings(run), dist=SequentialRank(rank, world_size))
        for rank in reversed(range(world_size))  # rank 0 last: it merges what the others wrote
    ]
    folder = summaries[-1].folder
    assert folder.name == reference_folder.name
    assert not (folder / "parts").exists()  # merged and cleaned up
    assert _folder_bytes(folder) == _folder_bytes(reference_folder)  # meta, index, failures and every shard
    assert (run.features / "current.json").read_bytes() == (reference.features / "current.json").read_bytes()
    # Every rank computed a share: batches r, r+W, ... of the one-process plan.
    assert all(s.forward_passes > 0 for s in summaries)


def test_a_killed_rank_resumes_and_the_merge_is_unchanged(one_process, tmp_path):
    reference, reference_folder = one_process
    run = _copy_split(reference, tmp_path / "run")

    def crash(shard):
        raise Crash(shard)

    with pytest.raises(Crash):  # rank 1 dies after its first part is on disk
        cache_features(run, _settings(run), dist=SequentialRank(1, 2), on_shard=crash)
    parts = sorted((run.features / reference_folder.name / "parts").glob("*.json"))
    assert len(parts) == 1
    before = parts[0].read_bytes()
    written = []
    cache_features(run, _settings(run), dist=SequentialRank(1, 2), on_shard=written.append)
    assert parts[0].read_bytes() == before  # the finished part was reused, not recomputed
    all_parts = sorted((run.features / reference_folder.name / "parts").glob("*.rank1.json"))
    assert 0 not in written and len(written) == len(all_parts) - 1 > 0
    cache_features(run, _settings(run), dist=SequentialRank(0, 2))
    assert _folder_bytes(run.features / reference_folder.name) == _folder_bytes(reference_folder)
    # With everything merged a re-run computes nothing on any rank.
    again = cache_features(run, _settings(run), dist=SequentialRank(0, 2))
    assert again.computed == 0 and again.forward_passes == 0


def test_parts_of_another_augmentation_are_not_reused(one_process, tmp_path):
    reference, _ = one_process
    run = _copy_split(reference, tmp_path / "run")

    def crash(shard):
        raise Crash(shard)

    with pytest.raises(Crash):
        cache_features(run, _settings(run), dist=SequentialRank(1, 2), on_shard=crash)
    other = _settings(run)
    other.data.augment = "aggressive"  # views >= 1 become other pixels: the finished part is stale
    written = []
    cache_features(run, other, dist=SequentialRank(1, 2), on_shard=written.append)
    assert 0 in written


def test_ranks_with_different_backbones_refuse_to_merge(one_process, tmp_path):
    from roadwork_cli.errors import UsageError

    reference, _ = one_process
    run = _copy_split(reference, tmp_path / "run")

    class Disagreeing(SequentialRank):
        def all_gather_json(self, value):
            return [value, "another fingerprint"]

    with pytest.raises(UsageError, match="fingerprints differ"):
        cache_features(run, _settings(run), dist=Disagreeing(0, 2))


def test_unreadable_images_are_merged_as_one_process_reports_them(tmp_path):
    from PIL import Image

    source = tmp_path / "images"
    for label in ("roadwork", "no_roadwork"):
        (source / label).mkdir(parents=True)
    for i in range(12):
        label = "roadwork" if i % 2 else "no_roadwork"
        Image.new("RGB", (40, 30), (20 * i, 90, 200 - 10 * i)).save(source / label / f"{i}.png")
    result = CliRunner().invoke(app, ["split", "--source", str(source), "--run", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    single = RunDir(tmp_path / "one")
    # Break two images after the split: cache-features must report them, on one process and on two.
    broken = sorted(source.rglob("*.png"))[:2]
    for path in broken:
        path.write_bytes(b"not an image")
    reference = cache_features(single, _settings(single, batch_size=2, shard_size=4))
    assert reference.failed == 2
    run = _copy_split(single, tmp_path / "two")
    for rank in (1, 0):
        summary = cache_features(run, _settings(run, batch_size=2, shard_size=4), dist=SequentialRank(rank, 2))
    assert summary.failed == 2
    assert _folder_bytes(summary.folder) == _folder_bytes(reference.folder)
    assert load_cached(run).failed == load_cached(single).failed


# ------------------------------------------------------------------------------------------ gloo process groups


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join_as(rank: int, world_size: int, port: int) -> Distributed:
    """The environment torchrun gives rank ``rank``, then the library's join."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    return distributed_from_env("cpu")


def _leave_together() -> None:
    """End a spawned rank the way a torchrun process ends: multiprocessing children skip atexit handlers."""
    from roadwork_cli.runtime.distributed import leave

    leave()


def _live_rank(rank: int, world_size: int, port: int) -> None:
    try:
        _live_step(rank, world_size, port)
    finally:
        _leave_together()


def _live_step(rank: int, world_size: int, port: int) -> None:
    """A live-image-style step: ranks hold different numbers of rows (rank 1 none: its images failed)."""
    dist = _join_as(rank, world_size, port)
    assert dist.all_gather_json({"rank": rank}) == [{"rank": r} for r in range(world_size)]
    state = dist.broadcast_state({"w": torch.arange(3.0), "epoch": 7} if dist.is_main else None)
    assert state["epoch"] == 7 and torch.equal(state["w"], torch.arange(3.0))
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, generator=generator), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    alone = torch.nn.Linear(4, 1)
    alone.load_state_dict(model.state_dict())
    own = slice(0, 3) if rank == 0 else slice(3, 3)
    # Only a batch statistic (the mean) couples the rows: the full-batch loss needs every rank's rows.
    logits = dist.gather(dist.wrap(model)(x[own]).squeeze(1))
    labels = dist.gather(y[own])
    assert torch.equal(labels, y[:3])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + logits.mean() ** 2
    loss.backward()
    reference = alone(x[:3]).squeeze(1)
    (torch.nn.functional.binary_cross_entropy_with_logits(reference, y[:3]) + reference.mean() ** 2).backward()
    for p, q in zip(model.parameters(), alone.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), (p.grad, q.grad)


def test_gather_handles_uneven_and_empty_parts_with_the_full_batch_gradient():
    import torch.multiprocessing as mp

    mp.start_processes(_live_rank, args=(2, _free_port()), nprocs=2, join=True, start_method="spawn")


def _train_settings(run: RunDir, epochs: int = 4, mode: str = "train_crc"):
    if mode == "train":  # live images through LoRA adapters, two batches per F-SAM step (collectives in the closure)
        train = {"mode": "train", "epochs": 3, "batch_size": 7, "accumulate": 2, "optimizer": "fsam", "lr": 1e-2}
        peft = {"method": "lora", "rank": 4, "dropout": 0.0}  # dropout masks would depend on the rows per rank
        # Scoring batches (each rank scores its part of a split), and the chunks the adapted backbone runs in: 3 rows
        # of a rank's 4 per batch, so every rank and the one process run their part of a batch in checkpointed chunks.
        features = {"workers": 0, "batch_size": 3}
    else:
        # batch 7 over 2 ranks: parts of 4 and 3 rows, and a last batch of 2 (16 = 7 + 7 + 2)
        train = {"mode": mode, "epochs": epochs, "batch_size": 7, "refit": True}
        peft, features = {"method": "none"}, {}
    overrides = {
        "runtime": {"run": str(run.root), "device": "cpu", "threads": 1},
        "model": {"backbone": "tiny_vit", "head_hidden": 16, "head_dropout": 0.0, "peft": peft},
        "features": features,
        "train": {"ema_decay": 0.0, **train},
    }
    return load_settings(None, overrides, environ={})


def _train_rank(rank: int, world_size: int, port: int, run_root: str, crash_after: int, mode: str) -> None:
    """One torchrun-like rank running the library's ``train``."""
    _join_as(rank, world_size, port)
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.training.api import train

    def crash(epoch, _metrics):
        if epoch == crash_after:
            raise Crash(epoch)

    rows_seen: list[int] = []  # rows of each training forward on this rank
    forward = SelectiveHead.forward

    def counting_forward(self, x):
        if self.training:
            rows_seen.append(int(x.shape[0]))
        return forward(self, x)

    SelectiveHead.forward = counting_forward
    run = RunDir(run_root)
    try:
        train(run, _train_settings(run, mode=mode), on_epoch_end=crash)
    except Crash:
        pass  # SIGKILL stand-in: the job stops after this epoch's checkpoint is on disk
    (run.root / f"rows_rank{rank}.json").write_text(json.dumps(rows_seen))
    _leave_together()


def _spawn_ranks(run: RunDir, crash_after: int = 0, world_size: int = 2, mode: str = "train_crc") -> None:
    import torch.multiprocessing as mp

    mp.start_processes(
        _train_rank, args=(world_size, _free_port(), str(run.root), crash_after, mode), nprocs=world_size, join=True,
        start_method="spawn",
    )  # fmt: skip


@pytest.mark.slow
def test_ddp_training_matches_one_process_and_resumes(one_process, tmp_path):
    from roadwork_cli.training.api import train

    reference, _ = one_process
    single, ranks = RunDir(tmp_path / "single"), RunDir(tmp_path / "ranks")
    for run in (single, ranks):
        shutil.copytree(reference.root, run.root)
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    train(single, _train_settings(single))
    _spawn_ranks(ranks, crash_after=2)  # both ranks stop after epoch 2; rank 0 wrote last.pt
    assert len((ranks.metrics).read_text().splitlines()) == 1 + 2
    _spawn_ranks(ranks)  # resumes from epoch 2 on both ranks
    assert len((ranks.metrics).read_text().splitlines()) == 1 + 4
    for rank in range(2):  # each rank ran its part of each batch (4 rows of a batch of 7), never a whole batch
        assert max(json.loads((ranks.root / f"rows_rank{rank}.json").read_text())) == 4
    a = load_file(str(single.checkpoints / "best.safetensors"))
    b = load_file(str(ranks.checkpoints / "best.safetensors"))
    # The same steps up to float summation order: a gradient summed from two part-batch products instead of one.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for split in ("val_calib", "test"):
        rows_a = (single.scores / f"{split}.csv").read_text().splitlines()
        rows_b = (ranks.scores / f"{split}.csv").read_text().splitlines()
        assert [r.split(",")[:2] for r in rows_a] == [r.split(",")[:2] for r in rows_b]  # ids and labels
        pa = torch.tensor([float(r.split(",")[2]) for r in rows_a[1:]])
        pb = torch.tensor([float(r.split(",")[2]) for r in rows_b[1:]])
        assert torch.allclose(pa, pb, atol=1e-5)


@pytest.mark.slow
def test_ddp_live_training_matches_one_process_and_resumes(tmp_path):
    """train --mode train: each rank decodes its part of every batch, an unreadable image included."""
    from roadwork_cli.training.api import train

    reference = _split(tmp_path / "reference")
    table = json.loads(reference.splits.read_text())
    broken = Path(table["samples"][table["splits"]["train"][3]]["path"])
    broken.write_bytes(b"not an image")  # a training image that fails to decode on whichever rank reads it
    single, ranks = RunDir(tmp_path / "single"), RunDir(tmp_path / "ranks")
    for run in (single, ranks):
        _copy_split(reference, run.root)
    summary = train(single, _train_settings(single, mode="train"))
    assert summary.n_failed == 1
    _spawn_ranks(ranks, crash_after=1, mode="train")  # both ranks stop after epoch 1; rank 0 wrote last.pt
    assert len(ranks.metrics.read_text().splitlines()) == 1 + 1
    _spawn_ranks(ranks, mode="train")  # resumes from epoch 1 on both ranks
    assert len(ranks.metrics.read_text().splitlines()) == 1 + 3
    for rank in range(2):  # each rank ran its part of each batch (4 rows of a batch of 7), never a whole batch
        assert max(json.loads((ranks.root / f"rows_rank{rank}.json").read_text())) == 4
    for name in ("best.safetensors", "best_backbone.safetensors"):  # head; backbone with the adapters merged
        a, b = load_file(str(single.checkpoints / name)), load_file(str(ranks.checkpoints / name))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    assert single.metrics.read_text().splitlines()[0] == ranks.metrics.read_text().splitlines()[0]
    for split in ("val_select", "val_calib", "test"):
        rows_a = (single.scores / f"{split}.csv").read_text().splitlines()
        rows_b = (ranks.scores / f"{split}.csv").read_text().splitlines()
        assert [r.split(",")[:2] for r in rows_a] == [r.split(",")[:2] for r in rows_b]  # ids and labels, in order
        pa = torch.tensor([float(r.split(",")[2]) for r in rows_a[1:]])
        pb = torch.tensor([float(r.split(",")[2]) for r in rows_b[1:]])
        assert torch.allclose(pa, pb, atol=1e-5)
    state = torch.load(ranks.checkpoints / "last.pt", weights_only=True)
    assert list(state["failed"]) == [table["splits"]["train"][3]]  # rank 1's failure, recorded by rank 0


# ------------------------------------------------------------------------------------------------ end to end


def _report(run: Path) -> dict:
    return json.loads((run / "eval" / "report.json").read_text())


def _invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def _torchrun(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--no-python", "--", str(ROADWORK), *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_features_and_report(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text(
        "runtime: {device: cpu, threads: 1}\n"
        "model: {backbone: tiny_vit, head_hidden: 16, head_dropout: 0.0}\n"
        "features: {batch_size: 4, shard_size: 10, views: 1, workers: 0}\n"
        "train: {epochs: 4, batch_size: 16, ema_decay: 0.0}\n"
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _split(one, n=60)
    _copy_split(RunDir(one), two)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)

    _invoke("cache-features", "--run", str(one), "--config", str(config))
    done = _torchrun("cache-features", "--run", str(two), "--config", str(config), env=env)
    assert "world size 2" in done.stderr
    a, b = load_cached(RunDir(one)), load_cached(RunDir(two))
    assert a.fingerprint == b.fingerprint and a.rows == b.rows
    assert torch.equal(a.features, b.features)
    assert _folder_bytes(one / "features" / a.fingerprint) == _folder_bytes(two / "features" / b.fingerprint)

    _invoke("train", "--run", str(one), "--config", str(config))
    done = _torchrun("train", "--run", str(two), "--config", str(config), env=env)
    assert "world size 2" in done.stderr
    wa = load_file(str(one / "checkpoints" / "best.safetensors"))
    wb = load_file(str(two / "checkpoints" / "best.safetensors"))
    assert wa.keys() == wb.keys()
    # Same steps up to float summation order (a gradient summed from two half-batch products instead of one).
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert (
        json.loads((one / "checkpoints" / "best.json").read_text())["epoch"]
        == json.loads((two / "checkpoints" / "best.json").read_text())["epoch"]
    )

    for run in (one, two):
        result = CliRunner().invoke(
            app, ["calibrate", "--run", str(run), "--config", str(config), "--allow-infeasible"]
        )
        assert result.exit_code in (0, 3), result.output
        _invoke("evaluate", "--run", str(run), "--config", str(config))
    ra, rb = _report(one), _report(two)
    assert ra.keys() == rb.keys()
    exact = ("n", "accuracy", "mcc", "coverage", "accuracy_on_exits", "fnr_on_exits", "fpr_on_exits")
    assert {k: ra[k] for k in exact} == {k: rb[k] for k in exact}
    assert ra["guarantee"]["satisfied"] == rb["guarantee"]["satisfied"]
    for key in ("auroc", "ece", "aurc"):
        assert ra[key] == pytest.approx(rb[key], abs=1e-4)
