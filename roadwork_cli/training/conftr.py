"""The conformal-training term of ``train --mode train_crc`` (in the spirit of ConfTr, Stutz et al., ICLR 2022).

The stage-1 gate rule exits an image iff its selection score ``s >= lambda`` and then decides roadwork iff its
calibrated ``p >= tau``; SCRC-I picks ``(lambda, tau)`` on val_calib so that coverage is at least ``xi`` and the
false-negative rate among exits (FNR on exits) at most ``alpha``, and among such pairs the best accuracy on exits.
The term simulates that calibration inside every batch and trains what it certifies:

1. The batch is split in two halves (the batch order is already a seeded shuffle): a *calibration* half and a
   *prediction* half.
2. The score is the one calibration will rank by. Calibration Platt-scales the cls logit on val_select
   (``p = sigmoid(a z + b)``) and, with ``softmax_response``, ranks by ``max(p, 1 - p)``: monotone in
   ``|z - z0|`` with ``z0 = -b / a`` (the raw logit where the scaled p is 0.5), not in ``|z|``, unless ``b = 0``. The
   term fits Platt on the calibration half (:func:`platt_center`, no gradient) and ranks by ``|z - z0|``. The gate score
   is ranked as it is (Platt on the gate is increasing). ``tau`` is compared with the raw logit: ``p >= tau`` is
   ``z >= logit-threshold``, the same decisions.
3. On the calibration half, smooth thresholds as SCRC-I would choose them at the targets: ``lambda`` = the smooth
   ``(1 - xi)``-quantile of ``s``, ``tau`` = the smooth ``alpha``-quantile of ``z`` among the positives, each weighted
   by its smooth exit indicator ``sigmoid((s - lambda) / T)``. ``tau`` is then held fixed.
4. On the prediction half, with ``e = sigmoid((s - lambda) / T)`` and the smooth miss ``m = sigmoid((tau - z) / T)``:

   * ``error``: the smoothed error on exits, ``sum(e (y m + (1 - y)(1 - m))) / sum(e)`` (SCRC-I's objective);
   * ``fnr_excess``: ``max(0, FNR on exits - alpha)`` with ``FNR = sum(e y m) / sum(e y)`` (the certified risk);
   * ``shortfall``: ``max(0, xi - coverage*)``, where ``coverage* = mean(sigmoid((s - lambda*) / T))`` and
     ``lambda*`` is the lowest threshold at which the prediction half's smoothed FNR on exits is ``alpha`` under the
     fixed ``tau`` (:func:`attainable_threshold`): lambda carries the coverage the head can afford at the risk target.

``term = error + fnr_excess + shortfall``. Why not the defer rate ``1 - mean(e)`` of the first version: with
``lambda`` a quantile of the other half, it is ``1 - xi`` by construction whatever the head does, so its gradient
averaged to noise. ``coverage*`` is not pinned: it rises when the scores rank the misses (positives below ``tau``)
below the rest, which is exactly what lets SCRC-I certify more coverage at the same ``alpha``; its gradient lowers the
score of misses and raises that of hits.

Smooth quantiles and ``lambda*`` are found without gradients (bisection) and differentiated by the implicit-function
theorem, so the term is differentiable end to end in ``s`` and ``z``. The term is a function of head outputs and labels
only, so the cached-feature loop and the live-image loop call it alike. It never sees val_calib: calibration after
``train_crc`` is the same SCRC-I, and the guarantee is unchanged.

Example:
    >>> out = HeadOutput(torch.randn(64), torch.randn(64), torch.randn(64))
    >>> term, parts = conformal_training_loss(out, (torch.rand(64) < 0.5).float(), alpha=0.02, coverage=0.8)
    >>> sorted(parts)
    ['coverage', 'error', 'fnr', 'fnr_excess', 'lambda', 'shortfall', 'tau', 'z0']
"""

from __future__ import annotations

from typing import Literal

import torch

from roadwork_cli.model.head import HeadOutput

__all__ = [
    "PARTS",
    "SELECTION_SCORES",
    "attainable_threshold",
    "conformal_training_loss",
    "platt_center",
    "selection_score",
    "smooth_quantile",
]

SELECTION_SCORES = ("gate", "softmax_response")
PARTS = ("error", "fnr_excess", "shortfall", "coverage", "fnr", "lambda", "tau", "z0")
"""Keys of the detached parts :func:`conformal_training_loss` returns."""
_BISECTION_STEPS = 50
_NEWTON_STEPS = 30
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


def platt_center(logits: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """``z0 = -b / a`` of Platt scaling ``p = sigmoid(a z + b)`` fit on ``(logits, labels)``, without gradient.

    The same maximum-likelihood fit as :class:`~roadwork_cli.calibration.scaling.PlattScaler` (which uses scipy on
    numpy arrays), solved by damped Newton in torch so it runs per batch on the training device. A small ridge keeps
    ``(a, b)`` finite on separable batches. One class only: the identity map (``z0 = 0``), as PlattScaler does.

    Args:
        logits: ``(N,)`` raw cls logits.
        labels: ``(N,)`` 0/1 labels.
        ridge: L2 penalty on ``(a - 1, b)`` added to the mean negative log-likelihood.

    Returns:
        A detached scalar ``z0`` in the logits' dtype: ``max(p, 1 - p)`` of the scaled p is increasing in
        ``|z - z0|`` when ``a > 0``.
    """
    z, y = logits.detach().double().reshape(-1), labels.detach().double().reshape(-1)
    if z.numel() == 0 or bool((y == y[0]).all()):
        return torch.zeros((), dtype=logits.dtype, device=logits.device)
    features = torch.stack([z, torch.ones_like(z)], dim=1)  # (N, 2)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, device=z.device)
    prior = params.clone()
    for _ in range(_NEWTON_STEPS):
        p = torch.sigmoid(features @ params)
        grad = features.T @ (p - y) / z.numel() + ridge * (params - prior)
        w = p * (1 - p) / z.numel()
        h11, h12, h22 = (w * z * z).sum() + ridge, (w * z).sum(), w.sum() + ridge
        # The 2 x 2 Newton system in closed form (no LAPACK call per step).
        step = torch.stack([h22 * grad[0] - h12 * grad[1], h11 * grad[1] - h12 * grad[0]]) / (h11 * h22 - h12 * h12)
        # Damped: a full Newton step can overshoot far from the optimum (the NLL is flat for large |a z + b|).
        params = params - step / step.norm().clamp_min(1.0)
    a, b = params[0].clamp_min(1e-6), params[1]
    return (-b / a).to(logits.dtype)


def selection_score(
    output: HeadOutput, score: Literal["gate", "softmax_response"], center: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """The rule's selection score in logit units, ``(B,)``.

    Args:
        output: Head logits, each ``(B,)``.
        score: ``gate`` (the gate logit; Platt on the gate is increasing, so it ranks as calibration does) or
            ``softmax_response`` (``|cls - center|``: monotone in ``max(p, 1 - p)`` of ``p = sigmoid(a cls + b)`` when
            ``center = -b / a``; see :func:`platt_center`).
        center: The raw cls logit where the scaled p is 0.5 (0: no scaling).
    """
    if score == "gate":
        return output.gate
    if score == "softmax_response":
        return (output.cls - center).abs()
    raise ValueError(f"unknown selection score {score!r}; expected one of {SELECTION_SCORES}")


def attainable_threshold(
    scores: torch.Tensor, labels: torch.Tensor, misses: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """``lambda*``: the lowest exit threshold at which the smoothed FNR on exits is at most ``alpha``.

    With ``e_i(lambda) = sigmoid((s_i - lambda) / T)``, the FNR on exits is at most alpha iff
    ``G(lambda) = sum(y_i e_i (m_i - alpha)) <= 0``. The root is the first sign change of ``G`` on the sorted scores
    (from low ``lambda``, full coverage, upwards), refined by bisection; there ``G`` falls, and the implicit-function
    theorem gives ``dlambda* = -dG / G'(lambda*)``: differentiable in ``scores`` and ``misses``.

    Args:
        scores: ``(N,)`` selection scores s.
        labels: ``(N,)`` 0/1 labels.
        misses: ``(N,)`` smooth miss indicators ``m`` in [0, 1] (gradients flow into them).
        alpha: Target FNR on exits.
        temperature: Sigmoid temperature T in the scores' units.

    Returns:
        A scalar threshold. Without gradient when every coverage is feasible (``lambda*`` below every score) or none
        is (``lambda*`` above every score: nothing can exit at this ``tau``).
    """
    s, y, m = scores.detach().double(), labels.detach().double(), misses.detach().double()
    span = 40.0 * temperature

    def excess(lam: torch.Tensor) -> torch.Tensor:  # G at each threshold in lam, (K,)
        exits = torch.sigmoid((s[None, :] - lam[:, None]) / temperature)  # (K, N)
        return (exits * (y * (m - alpha))[None, :]).sum(dim=1)

    candidates = torch.cat([(s.min() - span).reshape(1), torch.sort(s).values, (s.max() + span).reshape(1)])
    feasible = excess(candidates) <= 0
    if bool(feasible[0]) or not bool(feasible.any()):
        return candidates[0 if bool(feasible[0]) else -1].to(scores.dtype)
    k = int(torch.nonzero(feasible)[0])
    low, high = candidates[k - 1], candidates[k]  # G(low) > 0 >= G(high)
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        above = excess(mid.reshape(1))[0] > 0
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    root = high
    sig = torch.sigmoid((s - root) / temperature)
    slope = -(y * (m - alpha) * sig * (1 - sig)).sum() / temperature  # G'(root)
    if slope.item() > -_EPS:  # a touch, not a crossing: no well-defined derivative
        return root.to(scores.dtype)
    root_t = root.to(scores.dtype)
    excess_live = (labels * torch.sigmoid((scores - root_t) / temperature) * (misses - alpha)).sum()
    return root_t - excess_live / slope.to(scores.dtype)


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
        The scalar term (``error + fnr_excess + shortfall``; zero with a zero gradient when a half holds no roadwork
        image or the batch has fewer than 4 images) and its detached parts (:data:`PARTS`): the three summands, the
        prediction half's ``coverage*`` and ``fnr`` (at the calibration half's thresholds), ``lambda``, ``tau`` and the
        Platt center ``z0``.
    """
    labels = labels.to(output.cls.dtype)
    z = output.cls
    half = labels.shape[0] // 2
    zero = (output.gate.sum() + z.sum()) * 0.0  # keeps the graph (and the dtype/device) when there is nothing to do
    if half < 2 or labels[:half].sum() < 1 or labels[half:].sum() < 1:
        return zero, {k: zero.detach() for k in PARTS}
    z0 = zero.detach()
    if score == "softmax_response":
        # Clamped to the batch's logits: a centre beyond them ranks the batch as the nearest extreme does (monotone
        # in z either way), and a near-flat Platt slope (a random head) would put -b / a far out.
        z0 = platt_center(z[:half], labels[:half]).clamp(z.detach().min(), z.detach().max())
    s = selection_score(output, score, z0)
    s_cal, z_cal, y_cal = s[:half], z[:half], labels[:half]  # calibration half
    s_pred, z_pred, y_pred = s[half:], z[half:], labels[half:]  # prediction half
    lam = smooth_quantile(s_cal, 1.0 - coverage, temperature)
    exit_cal = torch.sigmoid((s_cal - lam) / temperature)  # (B/2,)
    tau = smooth_quantile(z_cal, alpha, temperature, weights=exit_cal * y_cal)
    exits = torch.sigmoid((s_pred - lam) / temperature)  # (B - B/2,)
    misses = torch.sigmoid((tau - z_pred) / temperature)  # smooth z < tau, (B - B/2,)
    wrong = y_pred * misses + (1 - y_pred) * (1 - misses)
    error = (exits * wrong).sum() / exits.sum().clamp_min(1e-6)
    fnr = (exits * y_pred * misses).sum() / (exits * y_pred).sum().clamp_min(1e-6)
    lam_star = attainable_threshold(s_pred, y_pred, misses, alpha, temperature)
    attainable = torch.sigmoid((s_pred - lam_star) / temperature).mean()
    fnr_excess = torch.relu(fnr - alpha)
    shortfall = torch.relu(coverage - attainable)
    parts = {
        "error": error, "fnr_excess": fnr_excess, "shortfall": shortfall, "coverage": attainable, "fnr": fnr,
        "lambda": lam, "tau": tau, "z0": z0 + zero,
    }  # fmt: skip
    return error + fnr_excess + shortfall, {k: v.detach() for k, v in parts.items()}
