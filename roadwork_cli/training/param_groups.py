"""Optimiser parameter groups for fine-tuning: head and adapter learning rates, layer-wise LR decay.

Layers are numbered with timm's ``group_matcher`` (timm ViT, Eva, EfficientNet, ConvNeXt, ... have one) through
``timm.models.group_parameters``; transformers models get a generic matcher (embeddings first, then numbered layers,
a final norm joins the last block). As in timm's ``param_groups_layer_decay`` (BEiT), the head is the top group and
keeps the full rate, and the backbone group k below it gets ``layer_decay ** k`` (the last block ``layer_decay``,
the stem the smallest rate); unlike timm, the rate is written into each group's ``lr``
(not an ``lr_scale`` key) because the schedules here are torch schedulers, which only scale ``lr``. Biases, norms,
DoRA magnitudes and other 0-D / 1-D tensors get no weight decay.

Example:
    >>> groups = create_param_groups(head, backbone, settings.train)  # doctest: +SKIP
    >>> optimizer = create_finetune_optimizer(head, backbone, settings.train)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from roadwork_cli.config import TrainSettings
from roadwork_cli.model.backbones import Backbone
from roadwork_cli.training.optim import adamw
from roadwork_cli.training.sam import wrap_optimizer

__all__ = ["create_finetune_optimizer", "create_param_groups", "layer_ids"]

# For networks without timm's group_matcher (transformers): the stem, then every numbered block; a final norm or
# pooler joins the last block ((99999,) is timm's "same group as the previous one"), anything unmatched goes last.
_GENERIC_MATCHER = {
    "stem": r"^(?:.*\.)?(?:embeddings|patch_embed|cls_token|pos_embed)",
    "blocks": [
        (r"^(?:.*\.)?(?:layer|layers|blocks|block|stages)\.(\d+)\.", None),
        (r"^(?:.*\.)?(?:norm|layernorm|final_layernorm|pooler)\.", (99999,)),
    ],
}


def layer_ids(network: nn.Module) -> dict[str, int]:
    """Parameter name -> layer index (0 = stem) of ``network``, counted over all parameters, trainable or not."""
    from timm.models import group_parameters

    matcher = network.group_matcher(coarse=False) if hasattr(network, "group_matcher") else _GENERIC_MATCHER
    return group_parameters(network, matcher, reverse=True)


def _split_decay(
    named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, prefix: str
) -> list[dict[str, Any]]:
    decay = [p for _, p in named if p.ndim > 1]
    no_decay = [p for _, p in named if p.ndim <= 1]
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{prefix}_decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{prefix}_no_decay"},
    ]
    return [group for group in groups if group["params"]]


def create_param_groups(
    head: nn.Module, backbone: nn.Module | None, train_settings: TrainSettings
) -> list[dict[str, Any]]:
    """AdamW parameter groups with explicit ``lr`` and ``weight_decay`` (trainable parameters only).

    Args:
        head: The three-output head; all its trainable parameters run at ``train.head_lr`` (default ``train.lr``).
        backbone: The adapted backbone (a Backbone or its network), or None when only the head trains. Its trainable
            parameters run at ``train.adapter_lr`` (default ``train.lr``), times ``layer_decay ** k`` for the group k
            steps below the head when ``train.layer_decay`` is set and not 1.
        train_settings: ``train`` settings (``lr``, ``head_lr``, ``adapter_lr``, ``layer_decay``, ``weight_decay``).

    Returns:
        Groups named ``head_decay``, ``head_no_decay``, ``layer{k}_decay``, ``layer{k}_no_decay``, ... (empty ones
        dropped).
    """
    base_lr, weight_decay = train_settings.lr, train_settings.weight_decay
    head_lr = train_settings.head_lr or base_lr
    adapter_lr = train_settings.adapter_lr or base_lr
    head_params = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    groups = _split_decay(head_params, head_lr, weight_decay, "head")
    if backbone is None:
        return groups
    network = backbone.model if isinstance(backbone, Backbone) else backbone
    trainable = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    decay = train_settings.layer_decay
    if not trainable:
        return groups
    if decay is None or decay == 1.0:
        return groups + _split_decay(trainable, adapter_lr, weight_decay, "backbone")
    ids = layer_ids(network)
    top = max(ids.values()) + 1  # the head's place: the backbone's last group is one step below it
    if top == 1:
        warnings.warn(
            f"train.layer_decay has no effect on {type(network).__name__}: its parameters form one layer group.",
            UserWarning,
            stacklevel=2,
        )
    by_layer: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, parameter in trainable:
        by_layer.setdefault(ids.get(name, top - 1), []).append((name, parameter))
    for layer in sorted(by_layer):
        groups += _split_decay(by_layer[layer], adapter_lr * decay ** (top - layer), weight_decay, f"layer{layer}")
    return groups


def create_finetune_optimizer(
    head: nn.Module, backbone: nn.Module | None, train_settings: TrainSettings
) -> torch.optim.Optimizer:
    """AdamW (:func:`~roadwork_cli.training.optim.adamw`) over :func:`create_param_groups`, wrapped in SAM / F-SAM
    when ``train.optimizer`` asks for it."""
    return wrap_optimizer(adamw(create_param_groups(head, backbone, train_settings), train_settings.lr), train_settings)
