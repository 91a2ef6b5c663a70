"""Backbone adapters: LoRA and DoRA through peft, DoRAN (ours), and merging them back into plain weights.

Registry in timm's style: ``list_adapter_methods()`` names the methods, ``create_adapter(method, model, targets,
settings)`` injects one into a network in place, and :func:`apply_adapters` is the one call the trainer needs: it
resolves the target layers (the backbone family's default or ``model.peft.target_modules``), freezes the base weights,
injects trainable adapters and keeps BatchNorm statistics frozen. :func:`merge_adapters` folds every adapter into the
weight it adapts (LoRA, DoRA and DoRAN all reduce to a plain weight at inference), so an exported bundle carries an
ordinary backbone state dict with exactly the base model's keys.

DoRAN (no reference code is public; the formulation is ours, see docs/architecture.md). For a targeted linear layer
with frozen weight ``W0`` (out x in) and bias ``b``, rank ``r`` and scaling ``s = alpha / r``:

    A, B = G_block(A_seed, B_seed)                       # (r, in), (out, r)
    V    = W0 + s * B @ A                                # (out, in)
    W'   = m / (||V||_row + softplus(theta)) * V         # one norm and one magnitude m_i per output i
    y    = W' x + b

``G_block`` is a generator shared by every targeted projection of one block (a residual two-layer GELU MLP acting on
the rank axis, one for the A side and one for the B side, output layers zero-initialised so ``G`` starts as the
identity). ``theta`` is one learnable scalar per layer; ``m`` starts at ``||W0||_row + softplus(theta)`` so the adapted
layer starts equal to the base layer. Unlike DoRA the norm is not detached from the gradient: the stabiliser bounds
the gradient through the normalisation (``1 / (||V|| + softplus(theta))``), which is its point. With the stabiliser
off (``doran_stabilizer=False``) and no generator (``doran_generator_hidden=0``) the forward pass equals peft's DoRA,
and so does the magnitude's gradient; the gradients of A and B do not: they carry the extra norm path, per row i
``-m_i (V_i . x) / ||V_i||^3 * V_i`` (times the upstream gradient), that DoRA drops. Training is therefore not DoRA's
in that limit, by choice. Dropout acts on the update's input only; in expectation over the mask the train-mode output
is the eval output (peft's DoRA differs in noise, not in mean: it also drops the input of its ``(m/||V|| - 1) W0``
correction).

Example:
    >>> from roadwork_cli.config import PeftSettings
    >>> from roadwork_cli.model.backbones import create_backbone
    >>> backbone = apply_adapters(create_backbone("tiny_vit"), PeftSettings(method="dora", rank=4))
    >>> merged = merge_adapters(backbone)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from roadwork_cli.config import PeftSettings
from roadwork_cli.errors import UsageError
from roadwork_cli.registry import Registry

__all__ = [
    "ADAPTERS",
    "DoranGenerator",
    "DoranLinear",
    "apply_adapters",
    "create_adapter",
    "default_target_modules",
    "freeze_norm_statistics",
    "list_adapter_methods",
    "merge_adapters",
    "register_adapter",
    "resolve_target_modules",
]

# Per family: candidate suffixes; only those present in the network are used (timm's DINOv3 variants differ in MLP).
_FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    "timm_vit": ("qkv", "q_proj", "k_proj", "v_proj", "proj", "fc1", "fc1_g", "fc1_x", "fc2"),
    "timm_efficientnet": ("conv_pw", "conv_pwl", "conv_head"),
    "transformers": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
_GENERATOR_ATTR = "doran_generator"
_NORM_HOOK_ATTR = "_roadwork_norm_hook"
_ADAPTABLE = (nn.Linear, nn.Conv2d)


# ---------------------------------------------------------------------------------------------------- target modules


def _network(module: nn.Module) -> nn.Module:
    """The wrapped network of a :class:`~roadwork_cli.model.backbones.Backbone`, or the module itself."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(module, "preprocessing") else module


def _block_path(name: str) -> str | None:
    """Dotted path up to the last numeric component (``blocks.3.attn.qkv`` -> ``blocks.3``), None outside blocks."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
    return ".".join(parts[: indices[-1] + 1]) if indices else None


def _family(model: nn.Module) -> str | None:
    cls = type(model)
    if cls.__module__.startswith("timm.") and cls.__name__ in {"VisionTransformer", "Eva"}:
        return "timm_vit"
    if cls.__module__.startswith("timm.") and cls.__name__ == "EfficientNet":
        return "timm_efficientnet"
    if cls.__module__.startswith("transformers."):
        return "transformers"
    return None


def _adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name and type(module) in _ADAPTABLE}


def _candidates(layers: Iterable[str]) -> list[str]:
    """Short names a user can write: the last component inside blocks, the full name outside them."""
    return sorted({name.rsplit(".", 1)[-1] if _block_path(name) else name for name in layers})


def _matches(name: str, target: str) -> bool:
    # Suffixes match only inside numbered blocks, so 'proj' adapts attn.proj but never patch_embed.proj.
    return name == target or (name.endswith("." + target) and _block_path(name) is not None)


def default_target_modules(model: nn.Module) -> list[str]:
    """The family default: timm ViT/Eva attention + MLP, transformers DINOv3 projections, EfficientNet 1x1 convs.

    Raises:
        UsageError: The family has no default; the message lists the layer names that can be targeted.
    """
    model = _network(model)
    family = _family(model)
    layers = _adaptable_layers(model)
    if family is None:
        raise UsageError(
            f"There is no default set of adapter target layers for {type(model).__name__}. Set "
            f"model.peft.target_modules to some of: {', '.join(_candidates(layers))}."
        )
    return [t for t in _FAMILY_TARGETS[family] if any(_matches(name, t) for name in layers)]


def resolve_target_modules(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full dotted names of the Linear / Conv2d layers that ``targets`` (suffixes or full names) select.

    Args:
        model: The network (or a Backbone wrapping it).
        targets: Names from the settings; None = :func:`default_target_modules`.

    Raises:
        UsageError: A name matches no Linear / Conv2d layer; the message lists the candidates.
    """
    model = _network(model)
    layers = _adaptable_layers(model)
    targets = default_target_modules(model) if targets is None else list(targets)
    if not targets:
        raise UsageError(
            "model.peft.target_modules is empty; leave it unset (null) for the backbone family's default or name "
            f"some of: {', '.join(_candidates(layers))}."
        )
    unknown = [t for t in targets if not any(_matches(name, t) for name in layers)]
    if unknown:
        raise UsageError(
            f"model.peft.target_modules: {', '.join(map(repr, unknown))} "
            f"{'matches' if len(unknown) == 1 else 'match'} no Linear or Conv2d layer of {type(model).__name__}. "
            f"Candidates: {', '.join(_candidates(layers))} (suffixes match inside numbered blocks; other layers "
            "by their full dotted name)."
        )
    # Keep the network's module order: it fixes parameter order, hence optimiser state layout.
    return [name for name in layers if any(_matches(name, t) for t in targets)]


# -------------------------------------------------------------------------------------------------------------- DoRAN


class DoranGenerator(nn.Module):
    """Produces the low-rank factors of every targeted projection of one block from their seed factors.

    A residual GELU MLP over the rank axis, one for A (applied to each input column's r-vector) and one for B (to
    each output row's r-vector); shared by the block's projections whatever their shapes, so their factors are
    coupled. Output layers start at zero: the generator starts as the identity.
    """

    def __init__(self, rank: int, hidden: int):
        super().__init__()
        self.a_in, self.a_out = nn.Linear(rank, hidden), nn.Linear(hidden, rank)
        self.b_in, self.b_out = nn.Linear(rank, hidden), nn.Linear(hidden, rank)
        for layer in (self.a_out, self.b_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, seed_a: torch.Tensor, seed_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, in), (out, r)`` seeds -> ``(r, in), (out, r)`` factors."""
        a = seed_a + self.a_out(F.gelu(self.a_in(seed_a.T))).T  # (in, r) through the MLP, back to (r, in)
        b = seed_b + self.b_out(F.gelu(self.b_in(seed_b)))  # (out, r)
        return a, b


class DoranLinear(nn.Module):
    """A frozen ``nn.Linear`` adapted by DoRAN (see the module docstring for the formulation).

    Attributes:
        base_layer: The frozen layer (same key prefix as peft's wrappers use).
        seed_a: ``(r, in)`` seed of A, Kaiming-uniform like LoRA's A.
        seed_b: ``(out, r)`` seed of B, zero so the update starts at zero.
        magnitude: ``(out,)`` magnitude m.
        theta: Scalar stabiliser parameter, or None when the stabiliser is off (exactly 0).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: DoranGenerator | None = None,
        stabilizer: bool = True,
        stabilizer_init: float = 1e-3,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = alpha / rank
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.seed_a = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        nn.init.kaiming_uniform_(self.seed_a, a=math.sqrt(5))
        self.seed_b = nn.Parameter(torch.zeros(base_layer.out_features, rank, **factory))
        if stabilizer:
            inverse_softplus = math.log(math.expm1(stabilizer_init))
            self.theta = nn.Parameter(torch.tensor(inverse_softplus, **factory))
        else:
            self.register_parameter("theta", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Not registered as a child: the block owns it, so a state dict holds it once, not once per projection.
        self._generator = (generator,) if generator is not None else ()
        with torch.no_grad():
            self.magnitude = nn.Parameter(weight.detach().norm(dim=1) + self.stabilizer().detach())  # (out,)

    def stabilizer(self) -> torch.Tensor:
        """softplus(theta), or an exact 0 when the stabiliser is off."""
        if self.theta is None:
            return torch.zeros((), device=self.seed_a.device, dtype=self.seed_a.dtype)
        return F.softplus(self.theta)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A (r, in), B (out, r)``: the generator's output, or the seeds themselves without one."""
        if self._generator:
            return self._generator[0](self.seed_a, self.seed_b)
        return self.seed_a, self.seed_b

    def _direction_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        direction = self.base_layer.weight + self.scaling * (b @ a)  # (out, in)
        scale = self.magnitude / (direction.norm(dim=1) + self.stabilizer())  # (out,)
        return direction, scale

    def merged_weight(self) -> torch.Tensor:
        """The plain weight W' this layer computes with, ``(out, in)``."""
        direction, scale = self._direction_and_scale()
        return scale[:, None] * direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direction, scale = self._direction_and_scale()
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return F.linear(x, (scale[:, None] * direction).to(x.dtype), bias)
        # Only the update's input is dropped, W0 sees x; unbiased, so the mean over masks is the eval output. peft's
        # DoRA also drops the input of its (scale - 1) * W0 term: same mean, other noise.
        a, b = self.factors()
        out = F.linear(x, self.base_layer.weight.to(x.dtype)) + self.scaling * F.linear(
            F.linear(self.dropout(x), a.to(x.dtype)), b.to(x.dtype)
        )
        out = out * scale.to(x.dtype)
        return out if bias is None else out + bias

    def merged_linear(self) -> nn.Linear:
        """The base layer carrying the merged weight (the adapter parts are dropped)."""
        with torch.no_grad():
            self.base_layer.weight.copy_(self.merged_weight())
        return self.base_layer


# ------------------------------------------------------------------------------------------------------------ registry

ADAPTERS: Registry[Callable[[nn.Module, list[str], PeftSettings], None]] = Registry("adapter method")
"""Injectors ``fn(model, target_names, peft_settings)`` by ``model.peft.method``; ``none`` injects nothing."""


register_adapter = ADAPTERS.register
"""Decorator adding ``fn(model, target_names, peft_settings)`` that injects adapters in place (duplicates refused)."""


def list_adapter_methods() -> list[str]:
    """Registered adapter methods, ``none`` (no adapters) included: the choices of ``model.peft.method``."""
    return ADAPTERS.names()


def create_adapter(method: str, model: nn.Module, target_names: list[str], peft_settings: PeftSettings) -> nn.Module:
    """Inject adapters of ``method`` into ``model`` at the full dotted ``target_names``; returns ``model``.

    Raises:
        UnknownNameError: Unknown method (a :class:`~roadwork_cli.errors.UsageError`).
    """
    ADAPTERS.get(method)(model, target_names, peft_settings)
    return model


@register_adapter("none")
def _none(model: nn.Module, target_names: list[str], peft_settings: PeftSettings) -> None:
    """No adapters: the backbone stays frozen and only the head trains."""


def _inject_peft(model: nn.Module, target_names: list[str], peft_settings: PeftSettings, use_dora: bool) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=peft_settings.rank,
        lora_alpha=peft_settings.alpha,
        lora_dropout=peft_settings.dropout,
        target_modules=list(target_names),
        use_dora=use_dora,
        bias="none",
    )
    inject_adapter_in_model(config, model)


@register_adapter("lora")
def _lora(model: nn.Module, target_names: list[str], peft_settings: PeftSettings) -> None:
    """LoRA through peft's ``LoraConfig``."""
    _inject_peft(model, target_names, peft_settings, use_dora=False)


@register_adapter("dora")
def _dora(model: nn.Module, target_names: list[str], peft_settings: PeftSettings) -> None:
    """DoRA through peft's ``LoraConfig(use_dora=True)``."""
    _inject_peft(model, target_names, peft_settings, use_dora=True)


@register_adapter("doran")
def _doran(model: nn.Module, target_names: list[str], peft_settings: PeftSettings) -> None:
    """DoRAN (ours): DoRA with a learnable norm stabiliser and per-block generated factors; Linear layers only."""
    linear = [name for name in target_names if type(model.get_submodule(name)) is nn.Linear]
    others = [name for name in target_names if name not in linear]
    if others:
        warnings.warn(
            f"DoRAN supports Linear layers only; these {len(others)} targets get DoRA instead: {', '.join(others)}.",
            UserWarning,
            stacklevel=3,
        )
        _inject_peft(model, others, peft_settings, use_dora=True)
    generators: dict[str | None, DoranGenerator | None] = {}
    for name in linear:
        block = _block_path(name)
        if block not in generators:
            generator = None
            if peft_settings.doran_generator_hidden > 0:
                owner = model.get_submodule(block) if block else model
                generator = DoranGenerator(peft_settings.rank, peft_settings.doran_generator_hidden)
                weight = model.get_submodule(name).weight
                generator.to(device=weight.device, dtype=weight.dtype)
                setattr(owner, _GENERATOR_ATTR, generator)
            generators[block] = generator
        layer = DoranLinear(
            model.get_submodule(name),
            rank=peft_settings.rank,
            alpha=peft_settings.alpha,
            dropout=peft_settings.dropout,
            generator=generators[block],
            stabilizer=peft_settings.doran_stabilizer,
            stabilizer_init=peft_settings.doran_stabilizer_init,
        )
        model.set_submodule(name, layer)


# ----------------------------------------------------------------------------------------------------- apply / merge


def _keep_norms_in_eval(module: nn.Module, args: Any) -> None:
    for norm in module._roadwork_norms:
        if norm.training:
            norm.train(False)


def freeze_norm_statistics(model: nn.Module) -> None:
    """Keep every BatchNorm of ``model`` in eval mode (running statistics used, never updated) in any train mode.

    A forward pre-hook, so it holds whatever ``train()`` calls the trainer makes; adapter dropout still follows them.
    """
    if getattr(model, _NORM_HOOK_ATTR, None) is not None:
        return
    model._roadwork_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    setattr(model, _NORM_HOOK_ATTR, model.register_forward_pre_hook(_keep_norms_in_eval))


def _route_fused_qkv_through_module(network: nn.Module, targets: list[str]) -> None:
    """timm's Eva attention with q/v biases calls ``F.linear(x, qkv.weight, bias)``, bypassing an adapter's forward.

    Its ``qkv_bias_separate`` mode computes the same ``qkv(x) + bias`` through the module, so the adapter is used.
    """
    for name in targets:
        parent = network.get_submodule(name.rpartition(".")[0]) if "." in name else network
        if (
            name.endswith("qkv")
            and getattr(parent, "q_bias", None) is not None
            and hasattr(parent, "qkv_bias_separate")
        ):
            parent.qkv_bias_separate = True


def apply_adapters(backbone: nn.Module, peft_settings: PeftSettings) -> nn.Module:
    """Freeze the backbone's weights and inject trainable adapters as ``peft_settings`` describe (in place).

    Args:
        backbone: A :class:`~roadwork_cli.model.backbones.Backbone` (its ``model`` is adapted) or a plain network.
        peft_settings: ``model.peft`` settings (method, rank, alpha, dropout, target_modules, DoRAN options).

    Returns:
        ``backbone``; with method ``none`` unchanged (frozen, head-only training).

    Raises:
        UsageError: Unknown method or target layers (the message lists the candidates).
    """
    if peft_settings.method == "none":
        return backbone
    network = _network(backbone)
    targets = resolve_target_modules(network, peft_settings.target_modules)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    _route_fused_qkv_through_module(network, targets)
    create_adapter(peft_settings.method, network, targets, peft_settings)
    freeze_norm_statistics(network)
    if network is not backbone:
        backbone.frozen = False  # train() now reaches the adapters' dropout; BatchNorm stays in eval (the hook)
    return backbone


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA / DoRA / DoRAN adapter into the weight it adapts (in place) and return ``model``.

    The result holds plain layers with exactly the base network's state-dict keys and computes the same outputs. A
    Backbone is frozen again and its ``weights_sha256`` (hence fingerprint) describes the merged weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    network = _network(model)
    with torch.no_grad():
        for name, module in list(network.named_modules()):
            if isinstance(module, DoranLinear):
                network.set_submodule(name, module.merged_linear())
            elif isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True)
                network.set_submodule(name, module.get_base_layer())
    for module in list(network.modules()):
        if isinstance(getattr(module, _GENERATOR_ATTR, None), DoranGenerator):
            delattr(module, _GENERATOR_ATTR)
    hook = getattr(network, _NORM_HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(network, _NORM_HOOK_ATTR)
        del network._roadwork_norms
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    if network is not model:
        from roadwork_cli.model.backbones import state_dict_sha256

        model.frozen = True
        model.eval()
        model.weights_sha256 = state_dict_sha256(network)
    return model
