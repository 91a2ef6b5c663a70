"""train --mode train_cached: artifacts, learning, determinism, resume (hook and real SIGKILL), modes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from split_helpers import edited_splits
from train_helpers import make_cached_run, train_settings

from roadwork_cli.errors import UsageError
from roadwork_cli.features.cache import FeatureStore, load_cached, read_split_table
from roadwork_cli.io.atomic import read_json
from roadwork_cli.io.run import RunDir
from roadwork_cli.training import cached as trainer
from roadwork_cli.training.api import train
from roadwork_cli.training.artifacts import SCORE_COLUMNS, evaluate_head, load_best_head


class Interrupted(Exception):
    pass


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_writes_every_artifact(cached_run):
    summary = train(cached_run, train_settings(cached_run))
    ckpt = cached_run.checkpoints
    info = read_json(ckpt / "best.json")
    assert info["epoch"] == summary.best_epoch and info["select_metric"] == "mcc"
    head_config = {"type": "SelectiveHead", "in_dim": 16, "hidden": 16, "dropout": 0.1, "standardize": False}
    assert info["head"] == dict(head_config, gate="shared", cls="linear")  # train.cls_fit=logistic_cv, the default
    assert info["cls_fit"]["C"] > 0 and info["cls_fit"]["fit_on"] == "train+val_select"
    assert any("logistic regression" in note for note in summary.notes)  # the table says which cls it shows
    assert info["fingerprint"] == "testfingerprint0" and info["backbone"]["name"] == "tiny_vit"
    head, _ = load_best_head(cached_run)
    assert set(load_file(str(ckpt / "best.safetensors"))) == set(head.state_dict())

    last = torch.load(ckpt / "last.pt", weights_only=True)
    assert last["epoch"] == 4 and {"model", "ema", "optimizer", "scheduler", "rng"} <= set(last)

    metrics = _rows(cached_run.metrics)
    assert [int(r["epoch"]) for r in metrics] == [1, 2, 3, 4]
    for column in (
        "loss",
        "loss_cls",
        "loss_selective",
        "loss_coverage",
        "loss_aux",
        "loss_fn",
        "val_accuracy",
        "val_mcc",
        "val_auroc",
        "val_aurc",
        "val_coverage",
        "lr",
    ):
        assert column in metrics[0]
    lrs = [float(r["lr"]) for r in metrics]
    assert lrs[-1] < max(lrs)  # cosine decay

    table = read_split_table(cached_run)
    for split in ("val_select", "val_calib", "test"):
        rows = _rows(cached_run.scores / f"{split}.csv")
        assert list(rows[0]) == list(SCORE_COLUMNS)
        assert [r["id"] for r in rows] == table.ids(split)
        assert [int(r["label"]) for r in rows] == [table.labels[i] for i in table.ids(split)]
        for r in rows:
            assert 0.0 <= float(r["p_roadwork"]) <= 1.0 and 0.0 <= float(r["gate"]) <= 1.0
            assert float(r["p_roadwork"]) == pytest.approx(float(torch.sigmoid(torch.tensor(float(r["logit_cls"])))))


def test_learns_separable_features(cached_run):
    summary = train(cached_run, train_settings(cached_run, epochs=8))
    assert summary.best_metrics["mcc"] > 0.7 and summary.best_metrics["auroc"] > 0.9
    test_rows = _rows(cached_run.scores / "test.csv")
    accuracy = sum((float(r["p_roadwork"]) >= 0.5) == (r["label"] == "1") for r in test_rows) / len(test_rows)
    assert accuracy > 0.85


def test_same_seed_gives_identical_weights_and_scores(tmp_path):
    runs = [make_cached_run(tmp_path / name) for name in ("a", "b")]
    for run in runs:
        train(run, train_settings(run))
    a, b = ((run.checkpoints / "best.safetensors").read_bytes() for run in runs)
    assert a == b
    assert (runs[0].scores / "test.csv").read_text() == (runs[1].scores / "test.csv").read_text()
    other = make_cached_run(tmp_path / "c")
    train(other, train_settings(other, seed=1))
    assert (other.checkpoints / "best.safetensors").read_bytes() != a


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    clean, broken = make_cached_run(tmp_path / "clean"), make_cached_run(tmp_path / "broken")
    train(clean, train_settings(clean, epochs=5))

    def stop_after_two(epoch, metrics):
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(broken, train_settings(broken, epochs=5), on_epoch_end=stop_after_two)
    summary = train(broken, train_settings(broken, epochs=5))
    assert summary.resumed_from == 2 and summary.epochs_run == 3
    for name in ("best.safetensors", "best.json"):
        assert (clean.checkpoints / name).read_bytes() == (broken.checkpoints / name).read_bytes()
    assert clean.metrics.read_text() == broken.metrics.read_text()
    a = torch.load(clean.checkpoints / "last.pt", weights_only=True)
    b = torch.load(broken.checkpoints / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])


@pytest.mark.parametrize("mode", ["train_cached", "train_crc"])
def test_sigkill_mid_training_then_rerun_gives_the_same_result(tmp_path, mode):
    clean, killed = make_cached_run(tmp_path / "clean"), make_cached_run(tmp_path / "killed")
    train(clean, train_settings(clean, epochs=4, mode=mode))
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]  # + split_helpers
        from train_helpers import train_settings
        from roadwork_cli.io.run import RunDir
        from roadwork_cli.training.api import train
        run = RunDir({str(killed.root)!r})
        def kill(epoch, metrics):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        train(run, train_settings(run, epochs=4, mode={mode!r}), on_epoch_end=kill)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert torch.load(killed.checkpoints / "last.pt", weights_only=True)["epoch"] == 2
    summary = train(killed, train_settings(killed, epochs=4, mode=mode))
    assert summary.resumed_from == 2
    assert (clean.checkpoints / "best.safetensors").read_bytes() == (
        killed.checkpoints / "best.safetensors"
    ).read_bytes()
    assert (clean.scores / "test.csv").read_text() == (killed.scores / "test.csv").read_text()


def test_changed_settings_do_not_resume_a_stale_checkpoint(cached_run):
    train(cached_run, train_settings(cached_run, epochs=2))
    summary = train(cached_run, train_settings(cached_run, epochs=3, lr=1e-3))
    assert summary.resumed_from == 0 and summary.epochs_run == 3
    finished = train(cached_run, train_settings(cached_run, epochs=3, lr=1e-3))
    assert finished.resumed_from == 3 and finished.epochs_run == 0  # nothing left: only the scores are rewritten


def test_each_epoch_draws_one_cached_view_per_image_and_every_view_at_its_rate(tmp_path):
    run = make_cached_run(tmp_path / "run", views=3)
    cached = load_cached(run)
    data = trainer._prepare(cached, read_split_table(run), torch.device("cpu"), run)
    assert data.train_counts.tolist() == [4] * 160
    # Replace each feature row by its own row number, so that a drawn feature says which (image, view) it was.
    owner = {row: (image_id, view) for image_id, views in cached.rows.items() for view, row in views.items()}
    data.features = torch.arange(data.features.shape[0], dtype=torch.float32)[:, None]  # (R, 1)
    train_ids = read_split_table(run).ids("train")
    epochs = 400
    drawn = Counter()
    for epoch in range(epochs):
        features, labels = trainer._epoch_batches(data, seed=0, epoch=epoch)
        rows = features[:, 0].long().tolist()
        images = [owner[r][0] for r in rows]
        assert sorted(images) == sorted(train_ids)  # exactly one row per training image in every epoch
        label_of = {i: y for i, y in zip(train_ids, data.train_labels.tolist(), strict=True)}
        assert labels.tolist() == [label_of[i] for i in images]  # labels travel with their features
        drawn.update(owner[r] for r in rows)
        again, _ = trainer._epoch_batches(data, seed=0, epoch=epoch)
        assert torch.equal(features, again)  # deterministic from (seed, epoch)
    # Each of the 4 views of each image is drawn Binomial(400, 1/4) times: mean 100, sd 8.7. +-5 sd fails a correct
    # drawer with probability < 1e-3 over all 640 cells, and an "always view 0" drawer always.
    for image_id in train_ids:
        for view in range(4):
            assert 100 - 5 * 8.7 < drawn[(image_id, view)] < 100 + 5 * 8.7, (image_id, view)
    per_view = [sum(drawn[(i, v)] for i in train_ids) for v in range(4)]  # each ~ 16000, sd ~110
    assert all(abs(count - 16000) < 5 * 110 for count in per_view), per_view


def _ema_and_raw(run: RunDir) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    last = torch.load(run.checkpoints / "last.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    return ema, last["model"]


@pytest.mark.parametrize("compile_head", [False, True], ids=["eager", "compiled"])
def test_the_weights_scored_for_selection_are_the_ema_weights_saved(cached_run, compile_head):
    """best.safetensors holds the EMA average (not the raw weights), and the val_select metrics that chose it are
    those of exactly these weights, also when the head is compiled (the EMA deep-copies a compiled head)."""
    settings = train_settings(cached_run, epochs=3, ema_decay=0.9)
    settings.model.compile = compile_head
    checked = []

    def check(epoch, metrics):
        info = read_json(cached_run.checkpoints / "best.json")
        if info["epoch"] != epoch:
            return
        saved = load_file(str(cached_run.checkpoints / "best.safetensors"))
        ema, raw = _ema_and_raw(cached_run)
        assert set(saved) == set(ema)
        for key in saved:
            torch.testing.assert_close(saved[key], ema[key], rtol=0, atol=0)
        assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # the average, not the raw weights
        head, _ = load_best_head(cached_run)
        data = trainer._prepare(load_cached(cached_run), read_split_table(cached_run), torch.device("cpu"), cached_run)
        with torch.inference_mode():
            rows = data.split_rows["val_select"]
            rescored = evaluate_head(head(data.features[rows]), data.split_labels["val_select"])
        assert rescored == pytest.approx(metrics, rel=1e-6, abs=1e-6)
        checked.append(epoch)

    train(cached_run, settings, on_epoch_end=check)
    assert checked and checked[0] == 1


def test_split_images_without_features_are_an_error_naming_the_count_and_the_command(cached_run):
    with edited_splits(cached_run) as raw:
        for n in range(3):
            image_id = f"new{n:061x}"
            raw["samples"][image_id] = {"path": f"/nowhere/{image_id}.png", "label": n % 2, "source": "test"}
            raw["splits"]["test" if n else "train"].append(image_id)
    with pytest.raises(UsageError, match=r"3 image\(s\).*roadwork cache-features --run"):
        train(cached_run, train_settings(cached_run))


def test_images_that_failed_to_decode_are_counted_not_silently_dropped(cached_run):
    bad = "bad" + "0" * 61
    with edited_splits(cached_run) as raw:
        raw["samples"][bad] = {"path": "/nowhere/bad.png", "label": 1, "source": "test"}
        raw["splits"]["test"].append(bad)
    store = FeatureStore(cached_run.features / "testfingerprint0")
    store.add_shard([], torch.zeros(0, 16), {bad: "unreadable: truncated file"})
    summary = train(cached_run, train_settings(cached_run, epochs=1))
    assert summary.n_failed == 1
    assert any("1 split image(s) failed to decode" in note for note in summary.notes)
    assert bad not in {r["id"] for r in _rows(cached_run.scores / "test.csv")}


def test_a_re_split_never_resumes_the_old_training(cached_run):
    train(cached_run, train_settings(cached_run, epochs=2))
    with edited_splits(cached_run) as raw:
        moved = raw["splits"]["train"][:10]
        raw["splits"]["train"] = raw["splits"]["train"][10:]
        raw["splits"]["val_calib"] += moved
    summary = train(cached_run, train_settings(cached_run, epochs=2))
    assert summary.resumed_from == 0 and summary.n_train == 150
    with edited_splits(cached_run) as raw:
        raw["samples"][raw["splits"]["train"][0]]["label"] ^= 1  # same ids, one label changed: also a new problem
    assert train(cached_run, train_settings(cached_run, epochs=2)).resumed_from == 0


def test_one_class_val_select_is_explained_once_without_warnings(cached_run):
    with edited_splits(cached_run) as raw:
        for image_id in raw["splits"]["val_select"]:
            raw["samples"][image_id]["label"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = train(cached_run, train_settings(cached_run, epochs=2))
    assert math.isnan(summary.best_metrics["auroc"])
    explained = [note for note in summary.notes if "only roadwork images" in note]
    assert len(explained) == 1 and "AUROC" in explained[0]
    assert read_json(cached_run.checkpoints / "best.json")["val_select"]["auroc"] is None


def test_missing_features(tmp_path, cached_run):
    bare = RunDir(tmp_path / "bare").ensure()
    bare.splits.write_text(cached_run.splits.read_text())
    with pytest.raises(UsageError, match="cache-features"):
        train(bare, train_settings(bare))


def test_ema_off_and_linear_head_still_train(cached_run):
    settings = train_settings(cached_run, ema_decay=0.0, select_metric="aurc", epochs=12, lr=1e-2)
    settings.model.head_hidden = 0
    summary = train(cached_run, settings)
    assert read_json(cached_run.checkpoints / "best.json")["ema"] is False
    assert summary.select_metric == "aurc" and summary.best_metrics["aurc"] < 0.2
    assert os.path.exists(cached_run.scores / "val_calib.csv")


def test_without_val_select_the_last_epoch_is_kept(tmp_path):
    run = make_cached_run(tmp_path / "run", counts=(100, 0, 20, 20))
    summary = train(run, train_settings(run, epochs=3))
    assert summary.best_epoch == 3 and summary.n_val_select == 0
    assert sum("val_select is empty" in note for note in summary.notes) == 1
    assert read_json(run.checkpoints / "best.json")["metric"] is None
    assert len(_rows(run.scores / "val_select.csv")) == 0 and len(_rows(run.scores / "test.csv")) == 20


def test_live_loop_settings_in_a_cached_mode_are_named_not_silently_ignored(cached_run):
    plain = train(cached_run, train_settings(cached_run, epochs=1))
    assert not any("--mode train only" in note for note in plain.notes)
    settings = train_settings(cached_run, epochs=1, optimizer="fsam", grad_clip=1.0)
    notes = [note for note in train(cached_run, settings).notes if "--mode train only" in note]
    assert len(notes) == 1 and "train.optimizer, train.grad_clip" in notes[0]
