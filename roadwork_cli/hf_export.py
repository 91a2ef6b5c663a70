"""Hugging Face export: a run as a folder that stock ``transformers`` loads as it is (its ``TimmWrapper`` classes).

``roadwork export --run DIR --format hf --out OUT_DIR`` writes, for a run whose backbone is a timm model and whose cls
logit is linear in the pooled features (``head.cls: linear``, what ``train.cls_fit: logistic_cv`` trains):

* ``config.json`` + ``model.safetensors``: ``TimmWrapperForImageClassification`` (``timm_model.`` weight prefix) of the
  backbone's timm architecture with a 2-class classifier into which the head's cls logit ``z = w·f + b`` and the
  calibration's probability scaling (identity, temperature, Platt, or a Dirichlet map that is Platt) are folded:
  logits ``[0, a·z + c]``, so ``softmax(logits)[1] = sigmoid(a·z + c)`` is stage 1's calibrated p(roadwork).
* ``preprocessor_config.json`` and ``config.json``'s ``pretrained_cfg``: timm's eval transform with the backbone's
  recipe (resize the shorter side to ``floor(size / crop_pct)``, centre crop, normalise), which gives the pixels
  :mod:`roadwork_cli.data.pixels` gives, except for JPEG draft decoding (see the model card).
* ``roadwork_meta.json``: thresholds, certificate, fingerprints, the fold, the verification, and the sha256 of every
  other file; ``roadwork/``: the bundle members stage 1 needs beyond p (head with its gate, calibration), so
  ``roadwork predict --bundle OUT_DIR`` makes the same decisions as the run's bundle.tar, after verifying the folder.
* ``README.md``: a model card (what is certified, under which assumptions; the pipeline gives p only).

The folder is written into a temporary sibling, verified (read back with ``transformers`` and compared with the
PyTorch :class:`~roadwork_cli.stage1.Stage1Model` on sample inputs), then renamed into place.

Example:
    >>> export_hf("runs/demo", "runs/demo/hf")  # doctest: +SKIP
    {'out': PosixPath('runs/demo/hf'), 'architecture': 'tf_efficientnet_lite0', ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from roadwork_cli.errors import RoadworkError, UsageError
from roadwork_cli.io.hf_folder import HF_META, HF_META_FORMAT, is_hf_folder, read_hf_folder
from roadwork_cli.io.run import RunDir
from roadwork_cli.stage1 import BACKBONE_WEIGHTS, HEAD_WEIGHTS, MODEL_JSON, SCALING_JSON, SCRC_PARAMS_JSON, Stage1Model
from roadwork_cli.version import __version__

if TYPE_CHECKING:
    from roadwork_cli.config import Settings

__all__ = ["HF_LABELS", "HF_TOLERANCE", "HfExportRefused", "HfPlan", "export_hf", "parse_labels", "plan_hf_export"]

HF_LABELS = ("None", "Roadwork")
"""Default label names of class 0 and class 1 (class 1's probability is p(roadwork))."""

HF_TOLERANCE = 1e-4
"""Largest max abs difference of p(roadwork) between transformers and roadwork on the export's sample inputs (float32
rounding through the whole network, as for the ONNX graph: ``export.ONNX_TOLERANCE``; measured 2.6e-6 with
efficientnet_lite0)."""

HF_SAMPLES = 6
"""Seeded random inputs the folder is verified on."""

SATURATION = 1e-6
"""predict clips raw p to [1e-7, 1 - 1e-7] before scaling, so past that the fold is not exact: such inputs are counted
apart (``saturated``) and not held to the tolerance."""

TIMM_PREFIX = "timm_model."
ROADWORK_DIR = "roadwork"

# Test backbones built from timm classes with arguments of their own: the timm.create_model call that rebuilds them.
_TINY_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny_vit": ("vit_tiny_patch16_224", {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    "tiny_dinov3": ("vit_small_patch16_dinov3", {"embed_dim": 32, "depth": 2, "num_heads": 2}),
}


class HfExportRefused(UsageError):
    """The run cannot be written in the TimmWrapper layout exactly; the message gives the reason and alternatives."""


ALTERNATIVES = (
    "Alternatives: `roadwork export --run DIR` (bundle.tar, which `roadwork predict`, `serve` and the NATIX detector "
    "run as they are), `roadwork export --run DIR --natix OUT_DIR` (a NATIX miner module)"
)


def _refuse(reason: str, fix: str = "") -> HfExportRefused:
    return HfExportRefused(
        f"Cannot export this run in the Hugging Face TimmWrapper layout: {reason}. {fix}{ALTERNATIVES}."
    )


@dataclass
class HfPlan:
    """How a run maps onto ``TimmWrapperForImageClassification``.

    Attributes:
        architecture: timm model name for ``timm.create_model``.
        model_args: Extra ``timm.create_model`` arguments (``config.json``'s ``model_args``).
        weight: ``(D,)`` folded class-1 weights ``a·w``.
        bias: Folded class-1 bias ``a·b + c``.
        scaling: The cls scaling folded in (``{"method", "params"}``) and its ``a``, ``c``.
    """

    architecture: str
    model_args: dict[str, Any]
    weight: np.ndarray
    bias: float
    scaling: dict[str, Any] = field(default_factory=dict)


def parse_labels(text: str | None) -> tuple[str, str]:
    """``"None,Roadwork"`` -> ``("None", "Roadwork")``: two distinct non-empty names (class 0, class 1)."""
    if not text:
        return HF_LABELS
    names = tuple(part.strip() for part in text.split(","))
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise UsageError(
            f"--labels takes two distinct names, class 0 then class 1, e.g. 'None,Roadwork' (got {text!r})."
        )
    return names  # type: ignore[return-value]


def fold_scaling(scaling: dict[str, Any] | None) -> tuple[float, float]:
    """``(a, c)`` with ``scaler(sigmoid(z)) = sigmoid(a·z + c)`` for the cls scaler's JSON form.

    Raises:
        HfExportRefused: The scaling is not affine in the logit (a Dirichlet map with ``w1 != -w2``).
    """
    spec = scaling or {}
    method = str(spec.get("method", "none"))
    params = spec.get("params") or {}
    if method == "none":
        return 1.0, 0.0
    if method == "temperature":
        return 1.0 / float(params["temperature"]), 0.0
    if method == "platt":
        return float(params["a"]), float(params["b"])
    if method == "dirichlet":
        w1, w2, b = float(params["w1"]), float(params["w2"]), float(params["b"])
        # w1 log p + w2 log(1 - p) = w1 z exactly when w2 = -w1; otherwise a term in log p(1 - p) remains.
        if abs(w1 + w2) <= 1e-12 * max(1.0, abs(w1)):
            return w1, b
        raise _refuse(
            f"the Dirichlet scaling (w1 {w1:.4g}, w2 {w2:.4g}) is not affine in the cls logit, so no linear "
            "classifier reproduces the calibrated p",
            "Re-calibrate with calibration.scaling: platt (or temperature). ",
        )
    raise _refuse(f"unknown cls scaling {method!r}")


def timm_recipe(backbone: Any) -> tuple[str, dict[str, Any]]:
    """``(architecture, model_args)`` such that ``timm.create_model(architecture, **model_args)`` is the backbone.

    Raises:
        HfExportRefused: A transformers (``hf:``) backbone, or a network that is not a timm model.
    """
    name = str(backbone.name)
    if name.startswith("hf:"):
        raise _refuse(
            f"backbone {name!r} is a transformers model loaded with AutoModel (e.g. DINOv3 ViT), not a timm model; "
            "transformers has no image-classification class for it that a 2-class classifier could be loaded into",
            "Train on the timm DINOv3 instead (--backbone dinov3_vits16, dinov3_vitb16, ... or timm:<name>). ",
        )
    size = int(backbone.preprocessing.size)
    if name in _TINY_RECIPES:
        architecture, args = _TINY_RECIPES[name]
        return architecture, {**args, "img_size": size, "global_pool": "token"}
    model = backbone.model
    config = getattr(model, "pretrained_cfg", None) or {}
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if not architecture or not hasattr(model, "reset_classifier"):
        raise _refuse(f"backbone {name!r} ({type(model).__name__}) is not a timm model with a classifier to replace")
    args: dict[str, Any] = {}
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str) and pool:
        args["global_pool"] = pool  # ViT / Eva pooling (the DINOv3 entries use the CLS token)
    if backbone.image_size is not None and "img_size" in _init_arguments(model):
        args["img_size"] = int(backbone.image_size)
    return str(architecture), args


def _init_arguments(model: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(type(model).__init__).parameters)
    except (TypeError, ValueError):
        return set()


def plan_hf_export(model: Stage1Model) -> HfPlan:
    """Check that ``model`` can be exported exactly and compute the folded classifier.

    Raises:
        HfExportRefused: With the reason: not a timm backbone, adapters not merged, a cls logit that is not linear
            in the pooled features, a scaling that is not affine in the logit, or reduced-precision scores.
    """
    architecture, args = timm_recipe(model.backbone)
    if any("lora_" in key or "base_layer" in key for key in model.backbone.model.state_dict()):
        raise _refuse(
            "the backbone holds unmerged adapter layers (lora_* / base_layer), which the timm architecture lacks",
            "Merge the adapters first (training merges them into plain weights for export). ",
        )
    precision = model.recorded_recipe.get("compute_precision") or "fp32"
    if precision != "fp32":
        raise _refuse(
            f"calibration's scores were computed in {precision}, and a transformers pipeline computes in fp32",
            "Re-cache features and re-calibrate with runtime.precision: fp32. ",
        )
    head = model.head
    if getattr(head, "cls", None) != "linear":
        raise _refuse(
            f"the head's cls logit is its shared MLP output (head.cls: {getattr(head, 'cls', None)!r}: LayerNorm"
            f"{', Linear, GELU' if getattr(head, 'hidden', 0) else ''} then Linear), which is not linear in the pooled "
            "features",
            "Retrain with train.cls_fit: logistic_cv (the default of train_cached), whose cls logit is a logistic "
            "regression on the features (head.cls: linear). ",
        )
    scaling = model.rule.cls_scaler.to_dict() if model.rule is not None else {"method": "none", "params": {}}
    a, c = fold_scaling(scaling)
    weight = head.cls_linear.weight.detach().double().cpu().numpy()[0]  # (D,)
    bias = float(head.cls_linear.bias.detach().double().cpu().numpy()[0])
    return HfPlan(architecture, args, a * weight, a * bias + c, {**scaling, "a": a, "c": c})


def _build_classifier(model: Stage1Model, plan: HfPlan) -> tuple[Any, list[str]]:
    """The timm network with 2 classes, the backbone's weights and the folded classifier; its classifier keys."""
    import timm
    import torch

    try:
        network = timm.create_model(plan.architecture, pretrained=False, num_classes=2, **plan.model_args)
    except Exception as exc:  # noqa: BLE001 - an architecture timm cannot build is a refusal, with timm's reason
        raise _refuse(f"timm cannot rebuild {plan.architecture!r} with {plan.model_args}: {exc}") from None
    own = network.state_dict()
    backbone_state = {k: v.detach().cpu() for k, v in model.backbone.model.state_dict().items()}
    classifier = sorted(set(own) - set(backbone_state))
    if set(backbone_state) - set(own) or not classifier:
        raise _refuse(f"timm's {plan.architecture!r} does not hold backbone {model.backbone.name!r}'s weights")
    linear = network.get_classifier()
    if not isinstance(linear, torch.nn.Linear) or tuple(linear.weight.shape) != (2, plan.weight.size):
        raise _refuse(f"the classifier of {plan.architecture!r} is not a Linear({plan.weight.size}, 2)")
    network.load_state_dict(backbone_state, strict=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1] = torch.from_numpy(plan.weight).float()
        linear.bias[1] = plan.bias
    return network.eval(), classifier


def _sample_batch(size: int, n: int = HF_SAMPLES) -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=generator)  # roughly the scale of normalised pixels


def _roadwork_p(model: Stage1Model, batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated p and raw p of the PyTorch model on a normalised batch, computed as predict computes them."""
    import torch

    with torch.inference_mode():
        out = model.head(model.backbone(batch).float())
        p_raw = torch.sigmoid(out.cls.float()).numpy().astype(np.float64)
        g_raw = torch.sigmoid(out.gate.float()).numpy().astype(np.float64)
    return model.rule.calibrate(p_raw, g_raw)[0], p_raw


def _transformers_p(folder: Path, batch: Any, index: int) -> np.ndarray:
    """p(class ``index``) of the folder loaded by ``AutoModelForImageClassification``, offline."""
    import torch
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    loaded = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.inference_mode():
        logits = loaded(pixel_values=batch).logits.float()
    return torch.softmax(logits, dim=-1)[:, index].numpy().astype(np.float64)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _pretrained_cfg(preprocessing: Any) -> dict[str, Any]:
    """timm's data config for the backbone's recipe (what ``TimmWrapperImageProcessor`` builds its transform from)."""
    size = int(preprocessing.size)
    return {
        "input_size": [3, size, size],
        "interpolation": str(preprocessing.interpolation),
        "mean": [float(v) for v in preprocessing.mean],
        "std": [float(v) for v in preprocessing.std],
        "crop_pct": float(preprocessing.crop_pct),
        "crop_mode": "center",
    }


def _certificate(params: dict[str, Any]) -> dict[str, Any]:
    keys = ("method", "feasible", "certified", "targets", "attainable", "empirical", "n", "n_pos", "unit", "note")
    return {key: params[key] for key in keys if key in params}


def _new_folder(out: Path) -> Path:
    if out.exists() and not is_hf_folder(out) and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a `roadwork export --format hf` folder; choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    os.mkdir(tmp)  # plain mkdir: the umask's mode, as the files in it get
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames only: a reader sees the old folder or the new one, never a mix."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(
    run: RunDir | str | Path,
    out: str | Path | None = None,
    settings: Settings | None = None,
    labels: tuple[str, str] = HF_LABELS,
    tolerance: float = HF_TOLERANCE,
) -> dict[str, Any]:
    """Write the run as a transformers TimmWrapper folder (files in the module docstring), verified, atomically.

    Args:
        run: Trained and calibrated run directory.
        out: Folder to write (replaced when it is an earlier HF export); default ``<run>/hf``.
        settings: Resolved settings (``export.allow_uncertified``); defaults when None.
        labels: Names of class 0 and class 1 (class 1's probability is the calibrated p(roadwork)).
        tolerance: Largest allowed max abs difference of p between transformers and roadwork.

    Returns:
        A summary: ``out``, ``architecture``, ``labels``, ``verification``, ``fingerprint``, ``files``.

    Raises:
        HfExportRefused: The run cannot be exported exactly (the reason and the alternatives are in the message).
        UsageError: Uncertified calibration without ``export.allow_uncertified``, or ``out`` is another folder.
        RoadworkError: The written folder does not reproduce roadwork's p within ``tolerance``.
    """
    import torch

    from roadwork_cli.config import Settings

    settings = settings or Settings()
    run = run if isinstance(run, RunDir) else RunDir(run)
    out = Path(out) if out is not None else run.root / "hf"
    model = Stage1Model.from_run(run, device="cpu")
    params = dict(model.rule.params)
    if params.get("feasible", True) is False and not settings.export.allow_uncertified:
        raise UsageError(
            "This run's calibration did not certify its targets (feasible: false), so its export carries no "
            "guarantee. Re-calibrate, or export anyway with --allow-uncertified (export.allow_uncertified: true)."
        )
    if params.get("feasible", True) is False:
        warnings.warn(
            "Exporting an uncertified calibration (feasible: false): the folder's decisions carry no guarantee.",
            UserWarning,
            stacklevel=2,
        )
    plan = plan_hf_export(model)
    network, classifier_keys = _build_classifier(model, plan)

    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    prep = model.preprocessing
    config = TimmWrapperConfig(
        architecture=plan.architecture,
        model_args=plan.model_args or None,
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pretrained_cfg=_pretrained_cfg(prep),
    )
    wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model.load_state_dict(network.state_dict(), strict=True)

    head_bytes = run.best_weights.read_bytes()
    scaling_doc = json.loads(run.scaling.read_text()) if run.scaling.exists() else None
    info = {k: v for k, v in model.info.items() if k != "manifest"}
    spec = dict(info["backbone"]["spec"], weights=None)  # a local path means nothing elsewhere
    info["backbone"] = {"spec": spec, "fingerprint": model.backbone.fingerprint, "weights_member": BACKBONE_WEIGHTS}
    roadwork_files = {
        MODEL_JSON: (json.dumps(info, indent=2, sort_keys=True) + "\n").encode(),
        HEAD_WEIGHTS: head_bytes,
        SCRC_PARAMS_JSON: run.scrc_params.read_bytes(),
        **({SCALING_JSON: run.scaling.read_bytes()} if scaling_doc is not None else {}),
    }
    parts = {
        "backbone_fingerprint": model.backbone.fingerprint,
        "head_sha256": _sha(head_bytes),
        "scrc_params_sha256": _sha(roadwork_files[SCRC_PARAMS_JSON]),
        "scaling_sha256": _sha(roadwork_files.get(SCALING_JSON, b"")),
    }
    fingerprint = {"fingerprint": _fingerprint(parts), **parts}
    if run.bundle.is_file():
        fingerprint["bundle_tar_sha256"] = _sha(run.bundle.read_bytes())

    tmp = _new_folder(out)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Writing model shards" bar is noise on the CLI's stderr
        wrapper.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "TimmWrapperImageProcessor",
                    "architecture": plan.architecture,
                    "pretrained_cfg": _pretrained_cfg(prep),
                },
                indent=2,
            )
            + "\n"
        )
        # save_pretrained may leave 0600 files; give them the mode a plain open() gets under the umask, as ours have.
        mode = (tmp / "preprocessor_config.json").stat().st_mode & 0o777
        for path in tmp.iterdir():
            path.chmod(mode)
        (tmp / ROADWORK_DIR).mkdir()
        for name, data in roadwork_files.items():
            (tmp / ROADWORK_DIR / name).write_bytes(data)
        batch = _sample_batch(int(prep.size))
        ours, p_raw = _roadwork_p(model, batch)
        theirs = _transformers_p(tmp, batch, 1)
        inside = (p_raw > SATURATION) & (p_raw < 1 - SATURATION)
        diff = float(np.max(np.abs(ours - theirs)[inside])) if inside.any() else 0.0
        if not np.isfinite(diff) or diff > tolerance:
            raise RoadworkError(
                f"The transformers model does not reproduce roadwork's calibrated p: they differ by up to {diff:.3g} "
                f"(tolerance {tolerance:g}) on {int(inside.sum())} sample inputs; nothing was written."
            )
        verification = {
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "samples": len(batch),
            "saturated": int((~inside).sum()),
            "inputs": "seeded random normalised tensors",
            "compared": "softmax(AutoModelForImageClassification logits)[:, 1] vs Stage1Model's calibrated p",
        }
        meta = {
            "format": HF_META_FORMAT,
            "kind": "roadwork-hf-export",
            "roadwork_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {
                "torch": torch.__version__,
                "timm": _version("timm"),
                "transformers": _version("transformers"),
            },
            "labels": {str(i): name for i, name in enumerate(labels)},
            "roadwork_label": labels[1],
            "fold": {
                "architecture": plan.architecture,
                "model_args": plan.model_args,
                "classifier_keys": classifier_keys,
                "scaling": plan.scaling,
                "p": "softmax(logits)[1] = sigmoid(a * (w . f + b) + c): the head's cls logit and the scaling folded",
            },
            "thresholds": params.get("thresholds"),
            "gate_score": params.get("gate_score") or (scaling_doc or {}).get("gate_score"),
            "certificate": _certificate(params),
            "bundle": fingerprint,
            "recipe": info.get("recipe"),
            "verification": verification,
            "members": {name: f"{ROADWORK_DIR}/{name}" for name in roadwork_files},
            "backbone_weights": {
                "file": "model.safetensors",
                "prefix": TIMM_PREFIX,
                "keys": sorted(set(network.state_dict()) - set(classifier_keys)),
                "member": BACKBONE_WEIGHTS,
            },
        }
        (tmp / "README.md").write_text(model_card(meta, run.root.name))
        meta["files"] = {
            path.relative_to(tmp).as_posix(): {"sha256": _sha(path.read_bytes()), "size": path.stat().st_size}
            for path in sorted(tmp.rglob("*"))
            if path.is_file()
        }
        (tmp / HF_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        read_hf_folder(tmp)  # what predict will check, checked once before the folder is published
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": out,
        "architecture": plan.architecture,
        "labels": list(labels),
        "verification": verification,
        "fingerprint": fingerprint["fingerprint"],
        "files": sorted(meta["files"]) + [HF_META],
    }


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - a missing module is simply not recorded
        return ""


def _band_note(thresholds: dict[str, Any]) -> list[str]:
    """The band rule decides on p alone, so a pipeline user can apply it from the thresholds."""
    return [
        "",
        "This run's rule is the band rule, which decides on p alone: "
        f"`no_roadwork` if p < tau = {thresholds['tau']:.6g}, `roadwork` if p >= b = {thresholds['b']:.6g}, "
        "`defer` in between. Applied to the pipeline's score it gives stage 1's decisions, except for a p within the "
        "export's tolerance of a threshold.",
    ]


def model_card(meta: dict[str, Any], run_name: str) -> str:
    """README.md of the folder: usage, what p is, what is certified and under which assumptions."""
    cert = meta["certificate"]
    targets = cert.get("targets") or {}
    certified = cert.get("certified") or {}
    thresholds = meta.get("thresholds") or {}
    labels = meta["labels"]
    verification = meta["verification"]
    decode = (meta.get("recipe") or {}).get("decode") or {}
    draft = decode.get("jpeg_draft")
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-classification",
        "tags: [roadwork, timm, image-classification, selective-classification]",
        "---",
        "",
        f"# Roadwork stage 1 ({run_name}): {meta['fold']['architecture']}",
        "",
        f"Exported by `roadwork export --format hf` (roadwork {meta['roadwork_version']}). transformers loads it as "
        "it is, offline:",
        "",
        "```python",
        "from transformers import pipeline",
        'classify = pipeline("image-classification", model="PATH_OR_REPO")',
        f"p = {{r['label']: r['score'] for r in classify(\"street.jpg\")}}[\"{labels['1']}\"]",
        "```",
        "",
        f"Labels: 0 = `{labels['0']}`, 1 = `{labels['1']}`. The score of `{labels['1']}` is stage 1's **calibrated** "
        f"p(roadwork): the head's cls logit and the probability scaling ({meta['fold']['scaling'].get('method')}) are "
        "folded into the 2-class classifier. Checked at export against roadwork's PyTorch model on "
        f"{verification['samples']} inputs: max abs difference {verification['max_abs_diff']:.2g} (tolerance "
        f"{verification['tolerance']:g}).",
        "",
        "## What the pipeline does not give: the defer decision",
        "",
        "Stage 1 decides `roadwork`, `no_roadwork` or `defer` (send to stage 2) with calibrated thresholds "
        f"(`roadwork_meta.json`: thresholds {json.dumps(thresholds, sort_keys=True)}, selection score "
        f"`{meta.get('gate_score')}`). The guarantee is about those decisions, not about p alone. Run them with "
        "`roadwork predict IMAGE --bundle THIS_FOLDER`, which verifies every file's sha256 against "
        "`roadwork_meta.json` and uses the head and calibration in `roadwork/`.",
        *(_band_note(thresholds) if thresholds.get("rule") == "band" else []),
        "",
        "## What is certified",
        "",
        *(
            ["**Nothing: this calibration did not certify its targets (feasible: false); exported anyway.**", ""]
            if cert.get("feasible") is False
            else []
        ),
        f"- Calibration method: {cert.get('method')}; feasible: {cert.get('feasible')}; unit: {cert.get('unit')}; "
        f"n = {cert.get('n')} ({cert.get('n_pos')} positives).",
        f"- Targets: {json.dumps(targets, sort_keys=True)}.",
        f"- Certified bounds: {json.dumps(certified, sort_keys=True)}.",
        "",
        "Assumptions: deployment images are exchangeable with the calibration split (same sources, same mix of "
        "conditions); images are decoded and preprocessed as calibration did (resize the shorter side to "
        "floor(size / crop_pct), centre crop, normalise: `pretrained_cfg` in config.json); scores in fp32.",
        "",
        "Where the pipeline's pixels can differ from roadwork's: "
        + (
            "roadwork decodes large JPEGs (shorter side at least twice the resize target) at reduced size from the "
            "DCT, the pipeline decodes them in full; for such images p differs slightly and the certificate, which "
            "was computed on roadwork's decoding, applies to `roadwork predict`, not to the pipeline. PNGs and smaller "
            "JPEGs get the same pixels."
            if draft
            else "none known (roadwork decodes JPEGs in full, as the pipeline does)."
        ),
        "",
        f"Fingerprint {meta['bundle']['fingerprint']} (backbone {meta['bundle']['backbone_fingerprint']}).",
        "",
    ]
    return "\n".join(lines)
