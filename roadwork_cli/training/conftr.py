"""The conformal-training term of ``train --mode train_crc`` (in the spirit of ConfTr, Stutz et al., ICLR 2022).

The stage-1 rule exits an image iff its selection score ``s >= lambda`` and then decides roadwork iff its cls logit
``z >= tau``; SCRC-I picks ``(lambda, tau)`` on val_calib so that coverage is at least ``xi`` and the false-negative
rate among exits at most ``alpha``. Conformal training simulates that calibration inside every batch and penalises
what the simulated thresholds cost, so the head is trained for the calibrated objective itself:

1. The batch is split in two halves (the batch order is already a seeded shuffle): a *calibration* half and a
   *prediction* half.
2. On the calibration half, smooth thresholds: ``lambda`` = the smooth ``(1 - xi)``-quantile of ``s`` (so a fraction
   ``xi`` exits), ``tau`` = the smooth ``alpha``-quantile of ``z`` among the positives, each positive weighted by its
   smooth exit indicator ``sigmoid((s - lambda) / T)`` (so at most ``alpha`` of exited roadwork falls below ``tau``).
3. On the prediction half, with ``e = sigmoid((s - lambda) / T)`` and ``r = sigmoid((z - tau) / T)``: the smoothed
   defer rate ``1 - mean(e)`` and the smoothed error on exits ``sum(e * (y (1 - r) + (1 - y) r)) / sum(e)``.

``term = defer + error``. A smooth quantile ``q`` of values ``v`` with weights ``w`` is the root of
``sum(w sigmoid((q - v) / T)) = level * sum(w)``, found by bisection without gradients; its gradient comes from the
implicit-function theorem (``dq/dv_i = w_i sigmoid'_i / sum_j w_j sigmoid'_j`` and the matching ``dq/dw_i``), so the
term is differentiable end to end in ``s``, ``z`` and, through the weights, in ``lambda``.

The term is a function of head outputs and labels only, so the cached-feature loop and the live-image loop call it
alike. It never sees val_calib: calibration after ``train_crc`` is the same SCRC-I, and the guarantee is unchanged.

Example:
    >>> out = HeadOutput(torch.randn(64), torch.randn(64), torch.randn(64))
    >>> term, parts = conformal_training_loss(out, (torch.rand(64) < 0.5).float(), alpha=0.02, coverage=0.8)
    >>> sorted(parts)
    ['defer', 'error', 'lambda', 'tau']
"""

from __future__ import annotations

from typing import Literal

import torch

from roadwork_cli.model.head import HeadOutput

__all__ = ["SELECTION_SCORES", "conformal_training_loss", "selection_score", "smooth_quantile"]

SELECTION_SCORES = ("gate", "softmax_response")
_BISECTION_STEPS = 50
_EPS = 1e-12


def smooth_quantile(
    values: torch.Tensor, level: float, temperature: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The sigmoid-relaxed ``level``-quantile of ``values``: ``q`` with ``sum(w sigmoid((q - v) / T)) = level sum(w)``.

    Args:
        values: ``(N,)`` values (logits).
        level: Quantile level in (0, 1).
        temperature: Smoothing temperature T in the values' units; as T -> 0 it approaches the empirical quantile.
        weights: ``(N,)`` non-negative weights (default all ones); gradients flow into them too.

    Returns:
        A scalar with the quantile's value and its implicit-function gradient with respect to ``values`` and
        ``weights``.
    """
    v = values.detach().double()
    w = torch.ones_like(v) if weights is None else weights.detach().double().clamp_min(0.0)
    target = level * w.sum()
    # The root lies within a few temperatures of the values' range: there the weighted sigmoid sum is below /
    # above the target for any weights.
    span = 40.0 * temperature
    low, high = v.min() - span, v.max() + span
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        below = (w * torch.sigmoid((mid - v) / temperature)).sum() < target
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    root = (low + high) / 2
    # Implicit function theorem on F(q, v, w) = sum(w sigmoid((q - v)/T)) - level sum(w) = 0.
    sig = torch.sigmoid((root - v) / temperature)  # (N,)
    slope = w * sig * (1 - sig) / temperature  # dF/dq per element, (N,)
    total = slope.sum().clamp_min(_EPS)
    d_values = (slope / total).to(values.dtype)  # dq/dv_i
    quantile = root.to(values.dtype) + (d_values * (values - values.detach())).sum()
    if weights is not None:
        d_weights = (-(sig - level) / total).to(values.dtype)  # dq/dw_i
        quantile = quantile + (d_weights * (weights - weights.detach())).sum()
    return quantile


def selection_score(output: HeadOutput, score: Literal["gate", "softmax_response"]) -> torch.Tensor:
    """The rule's selection score in logit units, ``(B,)``: the gate logit, or ``|cls|`` (monotone in max(p, 1-p))."""
    if score == "gate":
        return output.gate
    if score == "softmax_response":
        return output.cls.abs()
    raise ValueError(f"unknown selection score {score!r}; expected one of {SELECTION_SCORES}")


def conformal_training_loss(
    output: HeadOutput,
    labels: torch.Tensor,
    alpha: float,
    coverage: float,
    temperature: float = 0.5,
    score: Literal["gate", "softmax_response"] = "gate",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The conformal-training term of one batch (see the module docstring).

    Args:
        output: Head logits, each ``(B,)``.
        labels: ``(B,)`` float 0/1 (1 = roadwork).
        alpha: Target false-negative rate among exits (``calibration.fnr``).
        coverage: Target exit rate xi (``calibration.coverage``).
        temperature: Sigmoid relaxation of the thresholds and indicators, in logit units.
        score: Selection score the rule exits on: the gate head or the softmax response.

    Returns:
        The scalar term (``defer + error``; zero with a zero gradient when a half holds no roadwork image or the
        batch has fewer than 4 images) and its detached parts ``defer``, ``error``, ``lambda``, ``tau``.
    """
    labels = labels.to(output.cls.dtype)
    s, z = selection_score(output, score), output.cls
    half = labels.shape[0] // 2
    zero = (s.sum() + z.sum()) * 0.0  # keeps the graph (and the dtype/device) when there is nothing to penalise
    if half < 2 or labels[:half].sum() < 1:
        parts = {"defer": zero, "error": zero, "lambda": zero, "tau": zero}
        return zero, {k: v.detach() for k, v in parts.items()}
    s_cal, z_cal, y_cal = s[:half], z[:half], labels[:half]  # calibration half
    s_pred, z_pred, y_pred = s[half:], z[half:], labels[half:]  # prediction half
    lam = smooth_quantile(s_cal, 1.0 - coverage, temperature)
    exit_cal = torch.sigmoid((s_cal - lam) / temperature)  # (B/2,)
    tau = smooth_quantile(z_cal, alpha, temperature, weights=exit_cal * y_cal)
    exits = torch.sigmoid((s_pred - lam) / temperature)  # (B - B/2,)
    says_roadwork = torch.sigmoid((z_pred - tau) / temperature)  # (B - B/2,)
    wrong = y_pred * (1 - says_roadwork) + (1 - y_pred) * says_roadwork
    defer = 1.0 - exits.mean()
    error = (exits * wrong).sum() / exits.sum().clamp_min(1e-6)
    parts = {"defer": defer, "error": error, "lambda": lam, "tau": tau}
    return defer + error, {k: v.detach() for k, v in parts.items()}
