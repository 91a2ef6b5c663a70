"""The conformal-training term (smooth quantiles, gradients, optimising it lowers it) and ``train --mode train_crc``."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_cached_run, train_settings

from roadwork_cli.io.run import RunDir
from roadwork_cli.model.head import HeadOutput, SelectiveHead
from roadwork_cli.training.api import train
from roadwork_cli.training.conftr import conformal_training_loss, selection_score, smooth_quantile


@pytest.mark.parametrize("level", [0.02, 0.2, 0.5, 0.9])
def test_smooth_quantile_approaches_the_empirical_quantile_as_the_temperature_shrinks(level):
    values = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    exact = torch.quantile(values, level).item()
    errors = [abs(smooth_quantile(values, level, t).item() - exact) for t in (0.5, 0.1, 0.01)]
    assert errors[2] < 0.02
    assert errors[2] < errors[0]
    # Defining property: the smoothed fraction of values below q is the level.
    q = smooth_quantile(values, level, 0.1)
    assert torch.sigmoid((q - values) / 0.1).mean().item() == pytest.approx(level, abs=1e-6)


def test_weights_restrict_the_quantile_to_the_weighted_values():
    values = torch.tensor([-5.0, -4.0, 1.0, 2.0, 3.0, 4.0])
    weights = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    q = smooth_quantile(values, 0.5, 0.01, weights=weights)
    assert 2.0 < q.item() < 3.0  # the median of 1..4, the zero-weight values play no role


def test_smooth_quantile_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(12, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(12, generator=generator, dtype=torch.float64).add(0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: smooth_quantile(v, 0.3, 0.4, weights=w), (values, weights))


def _batch(n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=generator) < 0.5).float()
    # A zero-mean direction: the head's LayerNorm would remove a shift shared by every feature.
    direction = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 0.0, 0.0])
    features = torch.randn(n, 8, generator=generator) + 0.6 * (2 * labels[:, None] - 1) * direction
    return features, labels


@pytest.mark.parametrize("score", ["gate", "softmax_response"])
def test_term_is_differentiable_end_to_end_with_finite_nonzero_gradients(score):
    features, labels = _batch()
    torch.manual_seed(0)
    head = SelectiveHead(8, hidden=16, dropout=0.0)
    term, parts = conformal_training_loss(head(features), labels, alpha=0.05, coverage=0.8, score=score)
    term.backward()
    grads = {name: p.grad for name, p in head.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    out_grad = grads["out.weight"]  # (3, H): rows cls, gate, aux
    assert out_grad[0].abs().sum() > 0  # the cls logit feels the error on exits through tau and the indicators
    assert (out_grad[1].abs().sum() > 0) == (score == "gate")  # the gate only matters when it is the score
    assert out_grad[2].abs().sum() == 0  # aux plays no role in the rule
    assert 0.0 <= parts["defer"].item() <= 1.0 and 0.0 <= parts["error"].item() <= 1.0


def test_lambda_sits_at_the_coverage_quantile_and_tau_at_the_fnr_quantile_of_exited_positives():
    features, labels = _batch(n=4000, seed=3)
    torch.manual_seed(0)
    out = SelectiveHead(8, hidden=16, dropout=0.0)(features)
    # A temperature well below the spread of the random head's logits, so the smooth thresholds are nearly hard.
    _, parts = conformal_training_loss(out, labels, alpha=0.1, coverage=0.7, temperature=0.002)
    half = 2000
    s, z, y = out.gate[:half].detach(), out.cls[:half].detach(), labels[:half]
    assert (s >= parts["lambda"]).float().mean().item() == pytest.approx(0.7, abs=0.02)
    exited_positives = z[(s >= parts["lambda"]) & (y == 1)]
    assert (exited_positives < parts["tau"]).float().mean().item() == pytest.approx(0.1, abs=0.03)


def test_a_few_steps_on_the_term_lower_it():
    features, labels = _batch(n=512, seed=4)
    torch.manual_seed(0)
    head = SelectiveHead(8, hidden=16, dropout=0.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)

    def term_value() -> float:
        with torch.no_grad():
            return conformal_training_loss(head(features), labels, alpha=0.05, coverage=0.8)[0].item()

    before = term_value()
    for step in range(20):
        order = torch.randperm(512, generator=torch.Generator().manual_seed(step))[:128]
        term, _ = conformal_training_loss(head(features[order]), labels[order], alpha=0.05, coverage=0.8)
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    after = term_value()
    assert after < 0.6 * before, (before, after)


def test_halves_without_roadwork_or_tiny_batches_contribute_zero_but_keep_the_graph():
    out = HeadOutput(torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True), torch.randn(6))
    term, parts = conformal_training_loss(out, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 0.02, 0.8)
    assert term.item() == 0.0 and parts["tau"].item() == 0.0
    term.backward()
    assert torch.equal(out.cls.grad, torch.zeros(6))
    tiny, _ = conformal_training_loss(HeadOutput(*(torch.randn(3) for _ in range(3))), torch.ones(3), 0.02, 0.8)
    assert tiny.item() == 0.0


def test_softmax_response_score_is_the_absolute_cls_logit():
    out = HeadOutput(torch.tensor([-2.0, 0.5]), torch.tensor([9.0, 9.0]), torch.zeros(2))
    assert torch.equal(selection_score(out, "softmax_response"), torch.tensor([2.0, 0.5]))
    with pytest.raises(ValueError, match="selection score"):
        selection_score(out, "nope")


# ---------------------------------------------------------------------------------------- train --mode train_crc


def _metrics(run: RunDir) -> list[dict[str, float]]:
    with open(run.metrics, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_train_crc_lowers_its_loss_and_the_term_over_a_few_epochs(tmp_path):
    run = make_cached_run(tmp_path / "run", counts=(320, 60, 60, 60))
    summary = train(run, train_settings(run, mode="train_crc", epochs=8, lr=1e-2))
    assert summary.mode == "train_crc"
    rows = _metrics(run)
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"]
    # The defer rate stays near 1 - xi = 0.2 by construction; the error on exits is what falls.
    assert 0.1 < rows[-1]["loss_conformal"] < 0.6 * rows[0]["loss_conformal"]
    assert (run.scores / "val_calib.csv").exists()


def test_the_term_changes_training_only_in_train_crc(tmp_path):
    cached, crc = make_cached_run(tmp_path / "cached", signal=1.0), make_cached_run(tmp_path / "crc", signal=1.0)
    train(cached, train_settings(cached, epochs=2))
    train(crc, train_settings(crc, mode="train_crc", epochs=2))
    assert all(row["loss_conformal"] == 0.0 for row in _metrics(cached))
    a, b = load_file(cached.checkpoints / "best.safetensors"), load_file(crc.checkpoints / "best.safetensors")
    assert not torch.equal(a["out.weight"], b["out.weight"])


def test_a_train_crc_checkpoint_is_not_resumed_for_other_calibration_targets(tmp_path):
    run = make_cached_run(tmp_path / "run")
    settings = train_settings(run, mode="train_crc", epochs=2)
    train(run, settings)
    assert train(run, settings).resumed_from == 2  # same problem: the finished run is picked up
    settings.calibration.fnr = 0.1
    assert train(run, settings).resumed_from == 0
