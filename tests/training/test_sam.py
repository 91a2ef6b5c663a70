"""SAM / F-SAM: two steps against hand-computed values, resume round trip, a falling loss, scheduler sharing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from roadwork_cli.config import TrainSettings
from roadwork_cli.training.sam import FSAM, OPTIMIZERS, SAM, wrap_optimizer


def _half_square_norm_steps(optimizer_factory, steps: int = 2) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """Minimise L(w) = ||w||^2 / 2 (so the gradient is w itself) from w = (3, 4); returns w and the optimiser."""
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = optimizer_factory([w])

    def closure():
        loss = 0.5 * (w * w).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.zero_grad()
        closure()
        optimizer.step(closure)
    return w.detach(), optimizer


def test_fsam_two_sgd_steps_match_hand_computation():
    # Step 1: g = (3, 4), m = g, d = g, |d| = 5, e = 0.05 * (3, 4) / 5 = (0.03, 0.04); gradient at w + e is
    #   (3.03, 4.04); SGD from the restored w: w1 = (3, 4) - 0.1 * (3.03, 4.04) = (2.697, 3.596).
    # Step 2: g = (2.697, 3.596), d = g - 1 * m = (-0.303, -0.404), |d| = 0.505, e = (-0.03, -0.04);
    #   m = 0.9 * (3, 4) + 0.1 * (2.697, 3.596) = (2.9697, 3.9596); gradient at w + e = (2.667, 3.556);
    #   w2 = (2.697, 3.596) - 0.1 * (2.667, 3.556) = (2.4303, 3.2404).
    w, optimizer = _half_square_norm_steps(lambda p: FSAM(torch.optim.SGD(p, lr=0.1)))
    torch.testing.assert_close(w, torch.tensor([2.4303, 3.2404], dtype=torch.float64), rtol=0, atol=1e-12)
    momentum = optimizer.state[optimizer.param_groups[0]["params"][0]]["momentum"]
    torch.testing.assert_close(momentum, torch.tensor([2.9697, 3.9596], dtype=torch.float64), rtol=0, atol=1e-12)


def test_sam_is_fsam_with_sigma_zero_by_hand():
    # Step 1 as F-SAM: w1 = (2.697, 3.596). Step 2: d = g = (2.697, 3.596) = 0.899 * (3, 4), |d| = 4.495,
    #   e = (0.03, 0.04); gradient at w + e = (2.727, 3.636); w2 = w1 - 0.1 * that = (2.4243, 3.2324).
    w, optimizer = _half_square_norm_steps(lambda p: SAM(torch.optim.SGD(p, lr=0.1), rho=0.05))
    torch.testing.assert_close(w, torch.tensor([2.4243, 3.2324], dtype=torch.float64), rtol=0, atol=1e-12)
    assert not any("momentum" in state for state in optimizer.state.values())  # SAM keeps no average


def test_fsam_two_adamw_steps_match_hand_computation():
    lr, wd, beta1, beta2, eps, rho = 0.1, 0.1, 0.9, 0.999, 1e-8, 0.05
    w, _ = _half_square_norm_steps(
        lambda p: FSAM(torch.optim.AdamW(p, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd), rho=rho)
    )
    # By hand, element by element. Step 1: perturbed gradient (3.03, 4.04); AdamW decays the *restored* weights.
    w0 = [3.0, 4.0]
    g1 = [3.03, 4.04]
    m1 = [(1 - beta1) * g for g in g1]
    v1 = [(1 - beta2) * g * g for g in g1]
    w1 = [
        w * (1 - lr * wd) - lr * (m / (1 - beta1)) / (math.sqrt(v / (1 - beta2)) + eps)
        for w, m, v in zip(w0, m1, v1, strict=True)
    ]
    # Step 2: d = w1 - (3, 4) (the first gradient is the average), then the perturbed gradient is w1 + e.
    d = [a - b for a, b in zip(w1, w0, strict=True)]
    norm = math.hypot(*d)
    g2 = [w + rho * di / norm for w, di in zip(w1, d, strict=True)]
    m2 = [beta1 * m + (1 - beta1) * g for m, g in zip(m1, g2, strict=True)]
    v2 = [beta2 * v + (1 - beta2) * g * g for v, g in zip(v1, g2, strict=True)]
    w2 = [
        w * (1 - lr * wd) - lr * (m / (1 - beta1**2)) / (math.sqrt(v / (1 - beta2**2)) + eps)
        for w, m, v in zip(w1, m2, v2, strict=True)
    ]
    # On paper for the first element: w1 = 0.99 * 3 - 0.1 = 2.87, d = (-0.13, -0.14), |d| = 0.19105,
    # g2 = 2.87 - 0.034023 = 2.835977, m2 / 0.19 = (0.2727 + 0.2835977) / 0.19 = 2.927883,
    # v2 / 0.001999 = (0.0091717 + 0.0080428) / 0.001999 = 8.61155, w2 = 0.99 * 2.87 - 0.1 * 2.927883 / 2.934544.
    assert w2[0] == pytest.approx(2.741527, abs=1e-5)
    torch.testing.assert_close(w, torch.tensor(w2, dtype=torch.float64), rtol=0, atol=1e-10)


def test_only_trainable_parameters_with_gradients_take_part():
    trained = nn.Parameter(torch.tensor([3.0, 4.0]))
    frozen = nn.Parameter(torch.tensor([100.0]), requires_grad=False)
    optimizer = FSAM(torch.optim.SGD([trained, frozen], lr=0.1))
    (0.5 * (trained * trained).sum()).backward()
    optimizer.first_step()
    # The norm is over the trainable tensor alone: e = 0.05 * (3, 4) / 5.
    torch.testing.assert_close(trained.detach(), torch.tensor([3.03, 4.04]))
    assert frozen.item() == 100.0 and "w" not in optimizer.state[frozen]


def _regression(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=generator)
    y = x @ torch.randn(5, 1, generator=generator) + 0.1 * torch.randn(64, 1, generator=generator)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)), x, y


def _train(model, optimizer, x, y, steps: int) -> list[float]:
    losses = []

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.zero_grad()
        losses.append(closure().item())
        optimizer.step(closure)
    return losses


@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_a_few_steps_lower_a_loss(name):
    model, x, y = _regression()
    settings = TrainSettings(optimizer=name)
    optimizer = wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), settings)
    assert isinstance(optimizer, FSAM if name == "fsam" else SAM)
    losses = _train(model, optimizer, x, y, steps=30)
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip_resumes_exactly():
    model, x, y = _regression(1)
    optimizer = FSAM(torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, sigma=0.5, lmbda=0.8)
    _train(model, optimizer, x, y, steps=3)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(model, optimizer, x, y, steps=3)

    resumed, _, _ = _regression(7)  # different initial weights: everything must come from the saved state
    resumed.load_state_dict(saved_model)
    other = FSAM(torch.optim.AdamW(resumed.parameters(), lr=1e-2))
    other.load_state_dict(saved_state)
    assert (other.rho, other.sigma, other.lmbda) == (0.1, 0.5, 0.8)
    _train(resumed, other, x, y, steps=3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_schedulers_drive_the_base_optimiser_through_the_wrapper():
    model, x, y = _regression()
    base = torch.optim.AdamW(model.parameters(), lr=1.0)
    optimizer = SAM(base)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    _train(model, optimizer, x, y, steps=1)
    scheduler.step()
    assert base.param_groups[0]["lr"] == 0.5 and optimizer.param_groups is base.param_groups


def test_wrap_optimizer_names_and_errors():
    assert OPTIMIZERS.names() == ["adamw", "fsam", "sam"]
    base = torch.optim.AdamW(nn.Linear(2, 1).parameters())
    assert wrap_optimizer(base, TrainSettings()) is base
    fsam = wrap_optimizer(base, TrainSettings(optimizer="fsam", sam_rho=0.1, fsam_sigma=0.5, fsam_lambda=0.7))
    assert (fsam.rho, fsam.sigma, fsam.lmbda) == (0.1, 0.5, 0.7)
    with pytest.raises(ValueError, match="closure"):
        fsam.step()
