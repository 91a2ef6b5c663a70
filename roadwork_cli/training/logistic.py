"""Exact L2 logistic regression for the head's cls output, its strength chosen by K-fold cross-validation.

``train.cls_fit: logistic_cv`` replaces the SGD-trained cls logit by a linear model of the features fit to
convergence: features standardised with the fit set's mean and sd, the objective of scikit-learn's
``LogisticRegression`` (``C * sum(log loss) + ||w||^2 / 2``, intercept not penalised), ``C`` chosen from
:data:`C_GRID` by the mean out-of-fold log loss over ``folds`` stratified, seeded folds, then refit on the whole
fit set. It is the recipe of the linear probe the head is measured against (``benchmarks/head_vs_probe.py``), so the
head cannot rank worse than the probe beyond solver tolerance; the small-n benchmark is why it is the default.

The solver is full-batch L-BFGS in float64 with a strong-Wolfe line search: deterministic for a given seed and
thread count, so a re-run after SIGKILL writes the same weights.

Example:
    >>> x = torch.cat([torch.randn(40, 3) + 2, torch.randn(40, 3) - 2])
    >>> y = torch.cat([torch.ones(40), torch.zeros(40)])
    >>> fit = fit_logistic_cv(x, y, folds=4)
    >>> bool((fit.logits(x)[:40] > 0).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["C_GRID", "LogisticFit", "fit_logistic", "fit_logistic_cv", "stratified_folds"]

C_GRID = tuple(float(c) for c in torch.logspace(-4, 2, 13, dtype=torch.float64))
"""Inverse regularisation strengths tried (those of the benchmark's probe: 1e-4 .. 1e2, half-decade steps)."""


@dataclass
class LogisticFit:
    """A fitted linear cls logit on raw features: ``logit = features @ weight + bias`` (standardisation folded in)."""

    weight: torch.Tensor  # (D,)
    bias: float
    c: float
    """The chosen inverse regularisation strength."""
    folds: int
    cv_log_loss: dict[float, float]
    """Mean out-of-fold log loss per C of the grid."""
    oof_logits: torch.Tensor  # (N,)
    """Out-of-fold logits of the fit set at the chosen C (each from the fold's model that did not see the image)."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` -> ``(B,)`` logits."""
        return features.to(self.weight.dtype) @ self.weight + self.bias


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, c: float, init: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``C * sum(BCE) + ||w||^2 / 2`` on ``(N, D)`` float64 ``x``; returns ``(w (D,), b ())``.

    Args:
        x: Standardised features.
        y: ``(N,)`` 0/1 labels.
        c: Inverse regularisation strength (scikit-learn's ``C``).
        init: Starting point (a fit at a neighbouring C converges in far fewer steps).
    """
    n, dim = x.shape
    w = (init[0].clone() if init is not None else torch.zeros(dim, dtype=x.dtype)).requires_grad_(True)
    b = (init[1].clone() if init is not None else torch.zeros((), dtype=x.dtype)).requires_grad_(True)
    # Objective divided by C * N, so its scale (and L-BFGS's tolerances) does not depend on n or C.
    l2 = 1.0 / (2.0 * c * n)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=1000, tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def stratified_folds(y: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """``(N,)`` fold number (``0 .. folds-1``) of each 0/1 label of ``y``: each class dealt round-robin in a seeded
    order, so every fold holds its share of both classes."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(y.shape[0], dtype=torch.long)
    for label in (0, 1):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        fold[members] = torch.arange(members.numel()) % folds
    return fold


def fit_logistic_cv(
    features: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0, c_grid: tuple[float, ...] = C_GRID
) -> LogisticFit:
    """L2 logistic regression on standardised ``(N, D)`` features, C by ``folds``-fold CV (log loss), refit on all.

    With fewer than ``folds`` samples of a class, the folds shrink to what that class allows (at least 2); with a
    single class there is nothing to cross-validate and the middle of the grid is used.
    """
    x = features.detach().double().cpu()
    y = labels.detach().double().cpu()
    mean, scale = x.mean(dim=0), x.std(dim=0, correction=0).clamp_min(1e-6)  # as StandardScaler; 0-sd: no signal
    z = (x - mean) / scale  # (N, D)
    smallest_class = int(min(y.sum().item(), (1 - y).sum().item()))
    k = min(folds, smallest_class)
    losses: dict[float, float] = {}
    oof = {c: torch.zeros_like(y) for c in c_grid}
    if k >= 2:
        fold = stratified_folds(y, k, seed)
        for f in range(k):
            train, held = fold != f, fold == f
            start = None
            for c in c_grid:  # small C first: each fit starts from the previous, more regularised one
                start = fit_logistic(z[train], y[train], c, init=start)
                oof[c][held] = z[held] @ start[0] + start[1]
        for c in c_grid:  # mean over folds of each fold's mean log loss, as scikit-learn's CV scores it
            losses[c] = (
                sum(float(F.binary_cross_entropy_with_logits(oof[c][fold == f], y[fold == f])) for f in range(k)) / k
            )
        best = min(c_grid, key=lambda c: (losses[c], c))  # ties: the stronger regularisation
    else:
        best = c_grid[len(c_grid) // 2]
    w, b = fit_logistic(z, y, best)
    weight = w / scale  # (D,) on raw features
    bias = float(b - (mean * weight).sum())
    return LogisticFit(weight, bias, best, max(k, 0), losses, oof[best].float())
