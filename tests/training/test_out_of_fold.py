"""No val_select score comes from a model fit on that image (issue 19, item 4), under every training setting.

Calibration fits its scaling, its threshold grid and ``gate_score: auto`` on ``scores/val_select.csv``; scores that a
model fit on the same images produced are optimistic there. The probe: train twice on runs that differ only in one
val_select image's label. Every model whose score of that image is written was either fit without it (its row stays
bit for bit the same) or fit on it (the flipped label moves the fit, and the row with it). One epoch, so the
selected epoch (model selection on val_select, which is not a fit on it) cannot change between the two runs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from split_helpers import edited_splits
from train_helpers import make_cached_run, train_settings

from roadwork_cli.features.cache import read_split_table
from roadwork_cli.io.atomic import read_json
from roadwork_cli.io.run import RunDir
from roadwork_cli.training.api import train

COMBOS = [
    ("train_cached", cls_fit, gate, refit)
    for cls_fit in ("logistic_cv", "sgd")
    for gate in ("shared", "crossfit")
    for refit in (False, True)
] + [("train_crc", "logistic_cv", "crossfit", True), ("train_crc", "sgd", "shared", True)]


def _trained(root: Path, mode: str, cls_fit: str, gate: str, refit: bool, flip: str | None = None) -> RunDir:
    run = make_cached_run(root, counts=(60, 30, 10, 10), seed=3, signal=1.0)
    if flip is not None:
        with edited_splits(run) as table:
            table["samples"][flip]["label"] = 1 - table["samples"][flip]["label"]
    settings = train_settings(
        run, mode=mode, epochs=1, min_steps_per_epoch=4, cls_fit=cls_fit, refit=refit, gate_folds=2
    )
    settings.model.head_gate = gate
    train(run, settings)
    return run


def _scores(run: RunDir, split: str) -> dict[str, tuple[str, ...]]:
    """Per image, the written score columns (the label column left out: it is what the probe flips)."""
    with open(run.score_file(split), newline="") as handle:
        return {row["id"]: tuple(v for k, v in row.items() if k not in ("id", "label")) for row in
                csv.DictReader(handle)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "cls_fit", "gate", "refit"), COMBOS)
def test_no_val_select_score_comes_from_a_model_fit_on_that_image(tmp_path, mode, cls_fit, gate, refit):
    base = _trained(tmp_path / "base", mode, cls_fit, gate, refit)
    probe = read_split_table(base).ids("val_select")[0]
    flipped = _trained(tmp_path / "flipped", mode, cls_fit, gate, refit, flip=probe)
    before, after = _scores(base, "val_select"), _scores(flipped, "val_select")
    assert set(before) == set(after) and probe in before
    assert after[probe] == before[probe], "a model that scored this val_select image was fit on it"
    # The probe reaches the fits: where the settings put val_select into the final head (the refit, the logistic
    # cls), the flipped label moves that head, and the val_calib / test scores it writes move with it.
    final_sees_val_select = refit or cls_fit == "logistic_cv"
    assert (_scores(base, "test") != _scores(flipped, "test")) == final_sees_val_select
    assert (_scores(base, "val_calib") != _scores(flipped, "val_calib")) == final_sees_val_select


def test_the_shared_gate_is_refit_on_the_errors_of_the_logistic_cls(tmp_path):
    """Under logistic_cv the cls the shared gate was trained beside is replaced; the gate row is fit again on the
    out-of-fold errors of the logistic regression, and nothing else of the selected epoch's head changes."""
    run = make_cached_run(tmp_path / "run", counts=(80, 30, 10, 10), seed=4, signal=1.0)
    selected: dict[str, torch.Tensor] = {}

    def keep_selected(epoch, _metrics):
        if read_json(run.checkpoints / "best.json")["epoch"] == epoch:
            selected.update(load_file(run.checkpoints / "best.safetensors"))

    settings = train_settings(run, epochs=2, min_steps_per_epoch=4)
    assert settings.train.cls_fit == "logistic_cv" and settings.model.head_gate == "shared"
    train(run, settings, on_epoch_end=keep_selected)
    info = read_json(run.checkpoints / "best.json")
    assert "logistic regression on train" in info["gate"]
    assert info["cls_fit"]["val_select_scores"]["fit_on"] == "train"
    best = load_file(run.checkpoints / "best.safetensors")
    assert set(best) == set(selected) | {"cls_linear.weight", "cls_linear.bias"}
    for key in selected:
        if key in ("out.weight", "out.bias"):
            assert torch.equal(best[key][[0, 2]], selected[key][[0, 2]])  # cls and aux rows as trained
            assert not torch.equal(best[key][1], selected[key][1])  # the gate row refit
        else:
            assert torch.equal(best[key], selected[key])


def test_a_rerun_after_the_refit_rebuilds_the_selection_head_exactly(tmp_path):
    """After the refit replaced ``best.*``, the selected epoch's head is no longer on disk; a re-run (as after SIGKILL
    once the epochs are done) trains it again from the seed: the same val_select scores and the same final head."""
    run = make_cached_run(tmp_path / "run", counts=(80, 30, 10, 10), seed=5, signal=1.0)
    settings = train_settings(run, epochs=3, min_steps_per_epoch=4, cls_fit="sgd", refit=True)
    train(run, settings)
    assert read_json(run.checkpoints / "best.json")["refit"] is True
    first = {split: run.score_file(split).read_bytes() for split in ("val_select", "val_calib", "test")}
    weights = run.checkpoints.joinpath("best.safetensors").read_bytes()
    assert train(run, settings).resumed_from == 3
    assert {split: run.score_file(split).read_bytes() for split in first} == first
    assert run.checkpoints.joinpath("best.safetensors").read_bytes() == weights
