"""The train_cached objective's parts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from roadwork_cli.config import LossWeights
from roadwork_cli.model.head import HeadOutput, SelectiveHead
from roadwork_cli.training.losses import LOSS_PARTS, selective_loss


def _output(cls, gate, aux=None):
    cls = torch.tensor(cls, dtype=torch.float32)
    return HeadOutput(cls, torch.tensor(gate, dtype=torch.float32), cls.clone() if aux is None else torch.tensor(aux))


def test_parts_and_weighted_total():
    out = _output([2.0, -1.0, 0.5, -3.0], [0.0, 1.0, -1.0, 2.0], [0.1, 0.2, -0.3, 0.4])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    weights = LossWeights(cls=1.0, selective=0.5, coverage_penalty=4.0, aux=0.25, fn_weight=2.0)
    total, parts = selective_loss(out, y, weights, target_coverage=0.9)
    assert set(parts) == set(LOSS_PARTS)
    per = F.binary_cross_entropy_with_logits(out.cls, y, reduction="none")
    g = torch.sigmoid(out.gate)
    torch.testing.assert_close(parts["cls"], per.mean())
    torch.testing.assert_close(parts["selective"], (g * per).mean() / g.mean())
    torch.testing.assert_close(parts["coverage"], torch.relu(0.9 - g.mean()) ** 2)
    torch.testing.assert_close(parts["aux"], F.binary_cross_entropy_with_logits(out.aux, y))
    torch.testing.assert_close(parts["fn"], (g * y * per).sum() / (g * y).sum())
    expected = (
        parts["cls"]
        + 0.5 * parts["selective"]
        + 4.0 * parts["coverage"]
        + 0.25 * parts["aux"]
        + 2.0 * parts["fn"]
        + weights.gate_correctness * parts["gate"]
    )
    torch.testing.assert_close(total, expected)


def test_full_gate_makes_selective_risk_the_plain_risk_and_no_coverage_penalty():
    out = _output([1.0, -2.0, 0.3], [30.0, 30.0, 30.0])
    y = torch.tensor([1.0, 0.0, 0.0])
    _, parts = selective_loss(out, y, LossWeights(), target_coverage=0.8)
    torch.testing.assert_close(parts["selective"], parts["cls"])
    assert parts["coverage"].item() == 0.0


def test_closed_gate_costs_the_squared_coverage_shortfall():
    _, parts = selective_loss(_output([0.0, 0.0], [-40.0, -40.0]), torch.tensor([0.0, 1.0]), LossWeights(), 0.8)
    assert parts["coverage"].item() == pytest.approx(0.64, abs=1e-6)
    assert math.isfinite(parts["selective"].item())


def test_fn_term_only_counts_roadwork_images():
    y = torch.tensor([0.0, 0.0, 1.0])
    _, confident_neg_wrong = selective_loss(_output([5.0, 5.0, 5.0], [0.0, 0.0, 0.0]), y, LossWeights(), 0.8)
    _, missed_positive = selective_loss(_output([-5.0, -5.0, -5.0], [0.0, 0.0, 0.0]), y, LossWeights(), 0.8)
    assert confident_neg_wrong["fn"].item() < 0.01 < 4.0 < missed_positive["fn"].item()
    _, no_positives = selective_loss(_output([1.0, 1.0], [0.0, 0.0]), torch.tensor([0.0, 0.0]), LossWeights(), 0.8)
    assert no_positives["fn"].item() == 0.0


def test_gradients_reach_every_output():
    cls, gate, aux = (torch.randn(8, requires_grad=True) for _ in range(3))
    total, _ = selective_loss(HeadOutput(cls, gate, aux), (torch.arange(8) % 2).float(), LossWeights(), 0.8)
    total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (cls, gate, aux))


def test_gate_term_fits_the_true_class_probability_and_never_trains_cls():
    cls, gate, aux = (torch.randn(6, requires_grad=True) for _ in range(3))
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    only_gate = LossWeights(cls=0.0, selective=0.0, coverage_penalty=0.0, aux=0.0, fn_weight=0.0, gate_correctness=1.0)
    total, parts = selective_loss(HeadOutput(cls, gate, aux), y, only_gate, 0.8)
    true_class_probability = torch.where(y > 0, torch.sigmoid(cls), 1 - torch.sigmoid(cls)).detach()
    torch.testing.assert_close(parts["gate"], F.binary_cross_entropy_with_logits(gate, true_class_probability))
    total.backward()
    assert cls.grad is None or cls.grad.abs().sum() == 0  # the target is detached
    assert gate.grad.abs().sum() > 0
    # A gate that is sure of every image is penalised where the classifier gives the true label little probability.
    _, sure = selective_loss(_output([-4.0, 4.0], [8.0, 8.0]), torch.tensor([1.0, 1.0]), LossWeights(), 0.8)
    assert sure["gate"].item() > 3.0


def _gate_aurc_on_fresh_data(gate_correctness: float, seed: int) -> float:
    """Fit a head on a small noisy problem it can memorise; AURC of its gate (errors at p >= 0.5) on fresh data."""
    generator = torch.Generator().manual_seed(seed)
    direction = F.normalize(torch.randn(64, generator=generator), dim=0)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 64, generator=generator)  # (n, 64)
        return x, (torch.rand(n, generator=generator) < torch.sigmoid(4.0 * x @ direction)).float()

    (x_train, y_train), (x_val, y_val) = draw(512), draw(512)
    torch.manual_seed(seed)
    head = SelectiveHead(64, 64, 0.1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = selective_loss(head(x_train), y_train, LossWeights(gate_correctness=gate_correctness), 0.8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = head.eval()(x_val)
    errors = ((torch.sigmoid(out.cls) >= 0.5).float() != y_val).float()
    order = torch.argsort(-out.gate, stable=True)
    return (errors[order].cumsum(0) / torch.arange(1, errors.numel() + 1)).mean().item()


def test_gate_correctness_makes_the_gate_rank_errors_better():
    # Without the term the selective risk only sees training errors (none once memorised) and the gate ranks poorly.
    seeds = (0, 1, 2)
    without = sum(_gate_aurc_on_fresh_data(0.0, s) for s in seeds) / len(seeds)
    with_term = sum(_gate_aurc_on_fresh_data(1.0, s) for s in seeds) / len(seeds)
    assert with_term < without - 0.01
