"""The stage-1 head: a shared MLP trunk with three one-logit outputs (SelectiveNet shape).

* ``cls``: roadwork logit, ``p_roadwork = sigmoid(cls)``.
* ``gate``: selection logit, ``sigmoid(gate)`` scores "the cls decision on this image will be right".
* ``aux``: auxiliary roadwork logit trained on every sample so the shared trunk stays a good classifier even where
  the gate rejects.

Example:
    >>> head = SelectiveHead(in_dim=32, hidden=16)
    >>> out = head(torch.zeros(4, 32))
    >>> tuple(out.cls.shape)
    (4,)
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from roadwork_cli.config import ModelSettings
from roadwork_cli.errors import UnknownNameError, UsageError

__all__ = ["HeadOutput", "SelectiveHead", "create_head"]


class HeadOutput(NamedTuple):
    """Three ``(B,)`` logits."""

    cls: torch.Tensor
    gate: torch.Tensor
    aux: torch.Tensor


class SelectiveHead(nn.Module):
    """[Standardise] -> LayerNorm -> [Linear -> GELU] -> Dropout -> Linear(3): one matmul for all three outputs.

    Args:
        in_dim: Feature dimension D of the backbone.
        hidden: Width of the shared hidden layer; 0 gives three linear heads on the normalised features.
        dropout: Dropout before the output layer.
        standardize: Standardise each feature with the training set's mean and standard deviation (buffers set by
            :meth:`set_standardization`, saved with the weights) before the LayerNorm.
        gate: ``"shared"``: the gate is the second output of the shared layer. ``"crossfit"``: the gate is its own
            linear layer on the detached hidden features, cls logit and ``|cls logit|`` (``gate_out``), so no gate
            loss reaches the trunk or the cls output; the trainer fits it on out-of-fold correctness
            (:attr:`GATE_KINDS`).
        cls: ``"shared"``: the cls logit is the first output of the shared layer. ``"linear"``: it is its own linear
            layer on the raw features (``cls_linear``), which the trainer sets to a cross-validated L2 logistic
            regression (``train.cls_fit``); gate and aux stay on the trunk (:attr:`CLS_KINDS`).
    """

    GATE_KINDS = ("shared", "crossfit")
    CLS_KINDS = ("shared", "linear")

    def __init__(
        self,
        in_dim: int,
        hidden: int = 256,
        dropout: float = 0.1,
        standardize: bool = False,
        gate: str = "shared",
        cls: str = "shared",
    ):
        super().__init__()
        # A record from elsewhere (best.json, a bundle's model.json) can carry any string: exit 2 with the choices.
        if gate not in self.GATE_KINDS:
            raise UnknownNameError(f"Unknown head gate kind {gate!r}; choose one of: {', '.join(self.GATE_KINDS)}.")
        if cls not in self.CLS_KINDS:
            raise UnknownNameError(f"Unknown head cls kind {cls!r}; choose one of: {', '.join(self.CLS_KINDS)}.")
        self.in_dim, self.hidden, self.dropout = int(in_dim), int(hidden), float(dropout)
        self.standardize = bool(standardize)
        self.gate = gate
        self.cls = cls
        if self.standardize:
            self.register_buffer("feature_mean", torch.zeros(self.in_dim))  # (D,)
            self.register_buffer("feature_scale", torch.ones(self.in_dim))  # (D,)
        # Features of different backbones live on very different scales; normalising keeps one learning rate usable.
        layers: list[nn.Module] = [nn.LayerNorm(self.in_dim)]
        width = self.in_dim
        if self.hidden > 0:
            layers += [nn.Linear(self.in_dim, self.hidden), nn.GELU()]
            width = self.hidden
        layers.append(nn.Dropout(self.dropout))
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(width, 3)
        if self.gate == "crossfit":
            self.gate_out = nn.Linear(width + 2, 1)
        if self.cls == "linear":
            self.cls_linear = nn.Linear(self.in_dim, 1)
        # Plain flag, so deepcopy/state_dict stay those of an ordinary module (see enable_compile).
        self.compiled = False

    def forward(self, features: torch.Tensor) -> HeadOutput:
        """``(B, D)`` features -> :class:`HeadOutput` of ``(B,)`` logits."""
        if self.compiled:
            try:
                logits = _compiled_logits()(self, features)  # (B, 3)
            except Exception as exc:  # noqa: BLE001 - compile failures surface lazily, on the first call
                message = f"torch.compile of the head failed ({type(exc).__name__}); running eagerly."
                warnings.warn(message, stacklevel=2)
                self.compiled = False
            else:
                return HeadOutput(logits[:, 0], logits[:, 1], logits[:, 2])
        logits = _head_logits(self, features)  # (B, 3)
        return HeadOutput(logits[:, 0], logits[:, 1], logits[:, 2])

    def enable_compile(self) -> bool:
        """Route forward through ``torch.compile``; returns False (with a warning) when it is unavailable.

        The compiled function takes the head as an argument instead of closing over it (a compiled bound method
        would): a deep copy (the EMA's) then runs its own weights, not those of the head it was copied from.
        """
        try:
            _compiled_logits()
        except Exception as exc:  # noqa: BLE001 - e.g. unsupported platform or Python version
            warnings.warn(f"torch.compile is unavailable ({exc}); the head runs eagerly.", stacklevel=2)
            self.compiled = False
        else:
            self.compiled = True
        return self.compiled

    def set_standardization(self, features: torch.Tensor) -> None:
        """Set the per-feature mean and standard deviation from ``(N, D)`` training features."""
        if not self.standardize:
            raise ValueError("this head was built with standardize=False")
        with torch.no_grad():
            self.feature_mean.copy_(features.float().mean(dim=0))
            # Constant features (e.g. dead ReLU channels) would divide by zero; they carry no signal anyway.
            self.feature_scale.copy_(features.float().std(dim=0).clamp_min(1e-6))

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (stored in ``best.json`` and bundles)."""
        return {
            "type": "SelectiveHead",
            "in_dim": self.in_dim,
            "hidden": self.hidden,
            "dropout": self.dropout,
            "standardize": self.standardize,
            "gate": self.gate,
            "cls": self.cls,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SelectiveHead:
        """Inverse of :attr:`config`.

        Raises:
            UsageError: A key is missing (a record written by another version: re-run ``roadwork train``).
        """
        missing = [key for key in ("in_dim", "hidden", "dropout", "standardize", "gate", "cls") if key not in config]
        if missing:
            raise UsageError(
                f"The head config {config} lacks {', '.join(missing)}: it was written by another version of roadwork; "
                "re-run `roadwork train` (and `roadwork export`)."
            )
        return cls(
            in_dim=int(config["in_dim"]),
            hidden=int(config["hidden"]),
            dropout=float(config["dropout"]),
            standardize=bool(config["standardize"]),
            gate=str(config["gate"]),
            cls=str(config["cls"]),
        )

    def hidden_features(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` features -> ``(B, W)`` output of the shared trunk (what every output layer reads)."""
        if self.standardize:
            features = (features - self.feature_mean) / self.feature_scale  # (B, D)
        return self.trunk(features)

    def crossfit_gate(self, hidden: torch.Tensor, cls_logit: torch.Tensor) -> torch.Tensor:
        """Gate logit ``(B,)`` of a ``gate="crossfit"`` head from ``(B, W)`` hidden features and ``(B,)`` cls logits.

        Both inputs are detached: the gate ranks what the cls output decided and never trains it. The trainer calls
        this with out-of-fold cls logits to fit ``gate_out``; forward calls it with the head's own.
        """
        z = cls_logit.detach()[:, None]  # (B, 1)
        return self.gate_out(torch.cat([hidden.detach(), z, z.abs()], dim=1))[:, 0]


def _head_logits(head: SelectiveHead, features: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` -> ``(B, 3)`` logits of ``head``: a free function of (module, input), so one compiled version
    serves every head instance, each with its own weights (dynamo guards on the module it is given)."""
    hidden = head.hidden_features(features)  # (B, W)
    logits = head.out(hidden)  # (B, 3)
    if head.cls == "linear":
        logits = torch.cat([head.cls_linear(features), logits[:, 1:]], dim=1)
    if head.gate == "crossfit":
        gate = head.crossfit_gate(hidden, logits[:, 0])  # (B,)
        logits = torch.stack([logits[:, 0], gate, logits[:, 2]], dim=1)
    return logits


_COMPILED: list[Any] = []


def _compiled_logits() -> Any:
    """``torch.compile(_head_logits)``, built once per process."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_head_logits, dynamic=True))
    return _COMPILED[0]


def create_head(model_settings: ModelSettings, in_dim: int) -> SelectiveHead:
    """Head from ``model`` settings (``head_hidden``, ``head_dropout``, ``head_standardize``, ``head_gate``,
    ``compile``)."""
    head = SelectiveHead(
        in_dim,
        hidden=model_settings.head_hidden,
        dropout=model_settings.head_dropout,
        standardize=model_settings.head_standardize,
        gate=model_settings.head_gate,
    )
    if model_settings.compile:
        head.enable_compile()
    return head
