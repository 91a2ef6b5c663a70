"""Sharpness-aware minimisation around a base optimiser: SAM and Friendly SAM (F-SAM).

Each step evaluates the gradient twice: at the weights ``w`` (the caller's ``backward``) and at a perturbed point
``w + e`` (the ``closure``); the base optimiser then steps from ``w`` with the second gradient.

F-SAM (Li et al., CVPR 2024) removes the full-batch component of the ascent direction, estimated by an exponential
moving average ``m`` of past gradients, because that component is what hurts generalisation:

    d = g - sigma * m              (first step ever: m = g and d = g)
    m <- lambda * m + (1 - lambda) * g
    e = rho * d / ||d||            (||.|| global over every trainable parameter)

Plain SAM (Foret et al., 2021) is ``sigma = 0``: ``e = rho * g / ||g||``. Only parameters that require a gradient and
have one take part. ``state_dict()`` holds the base optimiser's state and the moving averages, so a run resumes
exactly.

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> optimizer = FSAM(torch.optim.AdamW(model.parameters(), lr=1e-3))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> def closure():
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> _ = closure()
    >>> _ = optimizer.step(closure)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from roadwork_cli.config import TrainSettings
from roadwork_cli.registry import Registry

__all__ = ["FSAM", "OPTIMIZERS", "SAM", "wrap_optimizer"]

_EPS = 1e-12


class SAM(torch.optim.Optimizer):
    """Sharpness-aware wrapper of ``base_optimizer``; ``sigma > 0`` gives F-SAM (see the module docstring).

    Shares ``param_groups`` with the base optimiser, so learning-rate schedulers built on the wrapper drive the base.

    Args:
        base_optimizer: The optimiser that takes the actual step (AdamW in training).
        rho: Radius of the perturbation.
        sigma: Weight of the moving average subtracted from the gradient (0 = plain SAM, keeps no average).
        lmbda: Decay of the moving average of the gradient.
    """

    def __init__(
        self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, sigma: float = 0.0, lmbda: float = 0.9
    ):
        if rho <= 0:
            raise ValueError(f"rho must be positive, got {rho}")
        if not 0 <= lmbda < 1:
            raise ValueError(f"lambda must be in [0, 1), got {lmbda}")
        self.base_optimizer = base_optimizer
        self.rho, self.sigma, self.lmbda = float(rho), float(sigma), float(lmbda)
        super().__init__(base_optimizer.param_groups, dict(base_optimizer.defaults))
        self.param_groups = base_optimizer.param_groups

    def _taking_part(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad and p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move the weights to ``w + e`` using the gradients now in ``.grad`` (computed at ``w``)."""
        params = self._taking_part()
        directions = []
        for p in params:
            grad, state = p.grad, self.state[p]
            if self.sigma == 0:
                direction = grad
            elif "momentum" not in state:
                state["momentum"] = grad.detach().clone()
                direction = grad
            else:
                momentum = state["momentum"]
                direction = grad - self.sigma * momentum
                momentum.mul_(self.lmbda).add_(grad, alpha=1 - self.lmbda)
            directions.append(direction)
        if not params:
            return
        # The foreach forms are one kernel per dtype group on a GPU instead of a few per parameter (the loop's host
        # time showed up in the live loop); on the CPU they run the per-tensor ops, so the numbers are the loop's.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(directions)))
        scale = self.rho / (norm + _EPS)
        for p in params:
            self.state[p]["w"] = p.detach().clone()  # restored by copy, not by subtracting e: bit-exact
        if len({d.dtype for d in directions}) == 1:
            torch._foreach_add_(params, torch._foreach_mul(directions, scale.to(directions[0].dtype)))
        else:
            for p, direction in zip(params, directions, strict=True):
                p.add_(direction * scale.to(direction.dtype))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Restore ``w`` and let the base optimiser step with the gradients computed at ``w + e``."""
        for group in self.param_groups:
            for p in group["params"]:
                saved = self.state[p].pop("w", None)
                if saved is not None:
                    p.copy_(saved)
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One sharpness-aware step.

        Args:
            closure: Recomputes the loss on the same batch and calls ``backward`` (it runs at ``w + e``). The
                gradients at ``w`` must already be in ``.grad``.

        Returns:
            The closure's loss at the perturbed point.
        """
        if closure is None:
            raise ValueError("SAM and F-SAM need a closure that recomputes the loss and calls backward()")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step(zero_grad=False)
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimiser's state, the hyper-parameters and the moving averages (by parameter position)."""
        params = [p for group in self.param_groups for p in group["params"]]
        momentum = {i: self.state[p]["momentum"] for i, p in enumerate(params) if "momentum" in self.state[p]}
        return {
            "base": self.base_optimizer.state_dict(),
            "rho": self.rho,
            "sigma": self.sigma,
            "lmbda": self.lmbda,
            "momentum": momentum,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Inverse of :meth:`state_dict` (the parameters must be given in the same order)."""
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.rho, self.sigma, self.lmbda = state_dict["rho"], state_dict["sigma"], state_dict["lmbda"]
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            self.state[p].pop("momentum", None)
        for index, tensor in state_dict["momentum"].items():
            p = params[int(index)]
            self.state[p]["momentum"] = tensor.detach().to(device=p.device, dtype=p.dtype).clone()


class FSAM(SAM):
    """Friendly SAM: :class:`SAM` with the defaults ``rho = 0.05``, ``sigma = 1``, ``lambda = 0.9``."""

    def __init__(
        self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9
    ):
        super().__init__(base_optimizer, rho=rho, sigma=sigma, lmbda=lmbda)


OPTIMIZERS: Registry[Callable[[torch.optim.Optimizer, TrainSettings], torch.optim.Optimizer]] = Registry("optimizer")
"""Wrappers ``fn(base_optimizer, train_settings) -> optimizer`` by ``train.optimizer`` name."""


@OPTIMIZERS.register("adamw")
def _adamw(base_optimizer: torch.optim.Optimizer, train_settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW alone: the base optimiser, unwrapped."""
    return base_optimizer


@OPTIMIZERS.register("sam")
def _sam(base_optimizer: torch.optim.Optimizer, train_settings: TrainSettings) -> torch.optim.Optimizer:
    """SAM: the AdamW step taken at the worst point within radius ``train.sam_rho``."""
    return SAM(base_optimizer, rho=train_settings.sam_rho)


@OPTIMIZERS.register("fsam")
def _fsam(base_optimizer: torch.optim.Optimizer, train_settings: TrainSettings) -> torch.optim.Optimizer:
    """Friendly SAM: the ascent direction drops the gradient's running mean (``fsam_sigma``, ``fsam_lambda``)."""
    return FSAM(
        base_optimizer, rho=train_settings.sam_rho, sigma=train_settings.fsam_sigma, lmbda=train_settings.fsam_lambda
    )


def wrap_optimizer(base_optimizer: torch.optim.Optimizer, train_settings: TrainSettings) -> torch.optim.Optimizer:
    """``base_optimizer`` itself for ``adamw``, wrapped in :class:`SAM` / :class:`FSAM` for ``sam`` / ``fsam``.

    Args:
        base_optimizer: AdamW over the trainable parameters (e.g. from ``create_param_groups``).
        train_settings: ``train`` settings (``optimizer``, ``sam_rho``, ``fsam_sigma``, ``fsam_lambda``).

    Raises:
        UnknownNameError: ``train.optimizer`` names no registered optimiser.
    """
    return OPTIMIZERS.get(train_settings.optimizer)(base_optimizer, train_settings)
