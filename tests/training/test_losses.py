"""The train_cached objective's parts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from roadwork_cli.config import LossWeights
from roadwork_cli.model.head import HeadOutput
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
        parts["cls"] + 0.5 * parts["selective"] + 4.0 * parts["coverage"] + 0.25 * parts["aux"] + 2.0 * parts["fn"]
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
