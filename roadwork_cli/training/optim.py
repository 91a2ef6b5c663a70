"""AdamW with linear warm-up + cosine decay (per optimiser step) and a weight EMA.

Everything here is a thin configuration of torch / timm building blocks, so their state dicts make a run resumable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from roadwork_cli.config import TrainSettings

__all__ = ["adamw", "create_ema", "create_optimizer", "create_scheduler"]


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999) over parameter ``groups``; ``lr`` is the rate of groups that set none.

    The fused kernel (one op for all parameters) when the device supports it: on CPU it is several times faster than
    the per-tensor loop for a small head, where the optimiser step costs as much as the forward pass. The multi-tensor
    kernel otherwise.
    """
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), foreach=True)


def create_optimizer(model: nn.Module, train_settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW at ``train.lr``; biases and normalisation weights (1-D tensors) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": train_settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return adamw(groups, train_settings.lr)


FINAL_LR_FACTOR = 0.01
"""The cosine ends at this fraction of each parameter group's own peak learning rate."""


def create_scheduler(
    optimizer: torch.optim.Optimizer, train_settings: TrainSettings, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to 1 % of the peak, stepped once per batch.

    One factor scales every group from its own peak, so per-group rates (``head_lr``, ``adapter_lr``, layer decay)
    keep their ratios to the end; an absolute floor (CosineAnnealingLR's ``eta_min``) would lift the small ones.
    """
    total = max(1, train_settings.epochs * steps_per_epoch)
    warmup = min(int(round(train_settings.warmup_epochs * steps_per_epoch)), total - 1)
    decay_steps = max(1, total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(step - warmup, decay_steps) / decay_steps
        return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def create_ema(model: nn.Module, decay: float) -> nn.Module | None:
    """timm's ModelEmaV3 (an exponential moving average copy of the weights), or None when ``decay`` is 0.

    Warm-up (effective decay ``1 - (1 + step / 10) ** -1`` capped at ``decay``) lets the average follow the model in
    short runs instead of staying near the random initialisation; pass the global step to ``update``.
    """
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_gamma=10.0, warmup_power=1.0)
