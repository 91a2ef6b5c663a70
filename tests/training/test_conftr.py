"""The conformal-training term (smooth quantiles, gradients, optimising it lowers it) and ``train --mode train_crc``."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_cached_run, train_settings

from roadwork_cli.calibration.scaling import PlattScaler, softmax_response
from roadwork_cli.io.run import RunDir
from roadwork_cli.model.head import HeadOutput, SelectiveHead
from roadwork_cli.training.api import train
from roadwork_cli.training.conftr import (
    attainable_threshold,
    conformal_training_loss,
    platt_center,
    selection_score,
    smooth_quantile,
)


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
    assert all(0.0 <= parts[k].item() <= 1.0 for k in ("error", "fnr_excess", "shortfall", "coverage", "fnr"))


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


def test_steps_on_the_term_lower_it_and_the_error_on_exits():
    features, labels = _batch(n=512, seed=4)
    torch.manual_seed(0)
    head = SelectiveHead(8, hidden=16, dropout=0.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)

    def term_value() -> tuple[float, float]:
        with torch.no_grad():
            term, parts = conformal_training_loss(head(features), labels, alpha=0.05, coverage=0.8)
        return term.item(), parts["error"].item()

    before, error_before = term_value()
    for step in range(60):
        order = torch.randperm(512, generator=torch.Generator().manual_seed(step))[:128]
        term, _ = conformal_training_loss(head(features[order]), labels[order], alpha=0.05, coverage=0.8)
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    after, error_after = term_value()
    # The random head's gate ranks nothing, so its coverage part starts near 0 (full coverage is as good as any);
    # it rises while the cls output separates, and the sum still falls.
    assert after < 0.85 * before, (before, after)
    assert error_after < 0.6 * error_before, (error_before, error_after)


def test_halves_without_roadwork_or_tiny_batches_contribute_zero_but_keep_the_graph():
    out = HeadOutput(torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True), torch.randn(6))
    term, parts = conformal_training_loss(out, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 0.02, 0.8)
    assert term.item() == 0.0 and parts["tau"].item() == 0.0
    term.backward()
    assert torch.equal(out.cls.grad, torch.zeros(6))
    tiny, _ = conformal_training_loss(HeadOutput(*(torch.randn(3) for _ in range(3))), torch.ones(3), 0.02, 0.8)
    assert tiny.item() == 0.0


def test_softmax_response_score_is_the_distance_of_the_cls_logit_from_the_platt_center():
    out = HeadOutput(torch.tensor([-2.0, 0.5]), torch.tensor([9.0, 9.0]), torch.zeros(2))
    assert torch.equal(selection_score(out, "softmax_response"), torch.tensor([2.0, 0.5]))
    assert torch.equal(selection_score(out, "softmax_response", torch.tensor(1.0)), torch.tensor([3.0, 0.5]))
    with pytest.raises(ValueError, match="selection score"):
        selection_score(out, "nope")


def _biased_scores(n=400, shift=1.5, seed=5):
    """Raw logits whose Platt fit has a clear intercept: the labels follow sigmoid(z + shift), not sigmoid(z)."""
    generator = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, generator=generator, dtype=torch.float64)
    y = (torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(1.3 * z + shift)).double()
    return z, y


def test_platt_center_is_calibrations_platt_fit():
    z, y = _biased_scores()
    scaler = PlattScaler().fit(torch.sigmoid(z).numpy(), y.numpy())
    assert abs(scaler.params["b"]) > 0.5  # the setting this is about: a non-zero intercept
    assert platt_center(z, y).item() == pytest.approx(-scaler.params["b"] / scaler.params["a"], abs=5e-3)
    assert platt_center(z, torch.ones_like(y)).item() == 0.0  # one class: identity, as PlattScaler


def test_the_terms_softmax_response_ranks_as_calibration_does_under_a_platt_intercept():
    z, y = _biased_scores()
    half = z.shape[0] // 2
    # What calibration ranks by: max(p, 1 - p) of the Platt-scaled p (fit here on the half the term fits it on).
    scaler = PlattScaler().fit(torch.sigmoid(z[:half]).numpy(), y[:half].numpy())
    calibration = torch.from_numpy(softmax_response(scaler.transform(torch.sigmoid(z).numpy())))
    out = HeadOutput(z, torch.zeros_like(z), torch.zeros_like(z))
    _, parts = conformal_training_loss(out, y, alpha=0.05, coverage=0.8, score="softmax_response")
    trained = selection_score(out, "softmax_response", parts["z0"])
    pairs = torch.combinations(torch.arange(z.shape[0]), 2)  # every pair of images: same order under both scores?

    def discordant(score: torch.Tensor) -> float:
        a, b = score[pairs[:, 0]] - score[pairs[:, 1]], calibration[pairs[:, 0]] - calibration[pairs[:, 1]]
        return ((a * b) < 0).double().mean().item()

    assert discordant(trained) < 1e-3  # ties in float aside, the same ranking
    assert discordant(z.abs()) > 0.05  # |z| of the raw logit, the first version's score, ranks differently


# --------------------------------------------------------------------------- the coverage the head can afford


def test_attainable_threshold_is_the_lowest_lambda_with_fnr_on_exits_at_most_alpha():
    generator = torch.Generator().manual_seed(7)
    n, alpha, t = 3000, 0.1, 1e-3
    labels = (torch.rand(n, generator=generator) < 0.5).double()
    scores = torch.randn(n, generator=generator, dtype=torch.float64)
    # Misses are likelier at low scores, so deferring low scores lowers the FNR on exits.
    misses = (torch.rand(n, generator=generator, dtype=torch.float64) < 0.4 * torch.sigmoid(-2 * scores)).double()
    lam = attainable_threshold(scores, labels, misses, alpha, t).item()

    def fnr(threshold: float) -> float:
        exits = (scores >= threshold) & (labels == 1)
        return misses[exits].mean().item()

    assert fnr(lam) <= alpha + 1e-3
    below = scores[scores < lam].max().item()  # one more image exits: the FNR goes above alpha
    assert fnr(below - 1e-9) > alpha - 2e-3 and fnr(lam - 0.1) > alpha
    assert fnr(scores.min().item()) > alpha  # full coverage is not feasible here


def test_attainable_threshold_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(8)
    labels = (torch.rand(24, generator=generator) < 0.6).double()
    scores = torch.randn(24, generator=generator, dtype=torch.float64, requires_grad=True)
    misses = (0.4 * torch.sigmoid(-3 * scores.detach())).requires_grad_(True)  # misses rank low: a crossing exists
    lam = attainable_threshold(scores, labels, misses, 0.1, 0.5)
    assert scores.min() < lam < scores.max() and lam.requires_grad
    assert torch.autograd.gradcheck(lambda s, m: attainable_threshold(s, labels, m, 0.1, 0.5), (scores, misses))


def _hard_batch(gate_knows_misses: bool, n=512, seed=9, gate_noise=0.3):
    """A batch whose cls logit gets 15 % of each class wrong; the gate ranks those misses low or high."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=generator) < 0.5).float()
    z = 2.5 * (2 * labels - 1) + torch.randn(n, generator=generator)
    hard = torch.rand(n, generator=generator) < 0.15
    z = torch.where(hard, -z, z)
    confident = torch.where(hard, -1.0, 1.0) + gate_noise * torch.randn(n, generator=generator)
    gate = confident if gate_knows_misses else -confident
    return HeadOutput(z, gate, torch.zeros(n)), labels


def test_the_term_pays_for_the_coverage_a_bad_held_out_ranking_cannot_afford():
    good, labels = _hard_batch(gate_knows_misses=True)
    bad, _ = _hard_batch(gate_knows_misses=False)
    half = labels.shape[0] // 2
    # Same calibration half (so the same lambda and tau); only the prediction half's ranking differs.
    mixed = HeadOutput(good.cls, torch.cat([good.gate[:half], bad.gate[half:]]), good.aux)
    term_good, parts_good = conformal_training_loss(good, labels, alpha=0.05, coverage=0.8)
    term_bad, parts_bad = conformal_training_loss(mixed, labels, alpha=0.05, coverage=0.8)
    assert parts_good["tau"] == parts_bad["tau"] and parts_good["lambda"] == parts_bad["lambda"]
    # At that tau, a gate that defers the misses affords the coverage; one that exits them first affords little.
    assert parts_good["coverage"] > 0.75 and parts_bad["coverage"] < 0.3
    assert parts_good["shortfall"] < 0.05 < 0.5 < parts_bad["shortfall"]
    assert parts_bad["fnr_excess"] > parts_good["fnr_excess"]
    assert term_bad > term_good + 0.5


def test_the_coverage_parts_gradient_defers_misses_consistently_over_random_splits():
    """Statistical: over random halvings of one batch, the coverage part's gradient on the gate lowers the misses
    (positives below tau) and raises the hits, by many standard errors (the first version's defer part averaged to
    noise: its gradient was 1 - xi by construction, whatever the ranking)."""
    out, labels = _hard_batch(gate_knows_misses=True, seed=10, gate_noise=1.5)  # a gate that half knows
    draws = []
    for k in range(100):
        order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(k))
        gate = out.gate[order].clone().requires_grad_(True)
        _, parts = conformal_training_loss(HeadOutput(out.cls[order], gate, out.aux[order]), labels[order], 0.05, 0.8)
        half = labels.shape[0] // 2
        y, z, s = labels[order][half:], out.cls[order][half:], gate[half:]
        misses = torch.sigmoid((parts["tau"] - z) / 0.5)
        lam = attainable_threshold(s, y, misses, 0.05, 0.5)
        coverage = torch.sigmoid((s - lam) / 0.5).mean()
        (grad,) = torch.autograd.grad(-coverage, gate)
        back = torch.empty_like(grad)
        back[order] = grad
        draws.append(back)
    grads = torch.stack(draws)  # (draws, n): d(-coverage*)/d gate per image
    miss = (labels == 1) & (out.cls < 0)
    hit = (labels == 1) & (out.cls > 0)
    per_draw_miss, per_draw_hit = grads[:, miss].mean(1), grads[:, hit].mean(1)

    def t_stat(values: torch.Tensor) -> float:
        return (values.mean() / (values.std() / values.shape[0] ** 0.5)).item()

    assert t_stat(per_draw_miss) > 5  # gradient descent lowers the misses' gate
    assert t_stat(per_draw_hit) < -5  # and raises the hits'


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
    assert rows[-1]["loss_conformal"] < 0.6 * rows[0]["loss_conformal"]
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
