"""A NATIX StreetVision (subnet 72) miner from a bundle: the validator-facing remap of p, and the miner's files.

The validator rounds a miner's float with ``np.round`` (0.5 itself is "no roadwork"), scores
``(0.5 * MCC + 0.5 * accuracy) ** 3`` and cannot take "defer". Stage 1's calibrated p is the right *ranking*, but the
threshold that maximises that reward is rarely 0.5: on NATIX's challenge views (levels 0-3, mixed as
``data.natix_levels``) and a roadwork-heavy stream it moves. So the detector answers ``NatixRemap(p)``, a monotone
map of calibrated p whose reward-optimal threshold ``t`` (found on val_select under the challenge mix) lands just
above 0.5:

- ``p < t``  ->  ``0.5 * p / t``                                   (in [0, 0.5): rounds to 0, "no roadwork")
- ``p >= t`` ->  ``0.5 + eps + (0.5 - eps) * (p - t) / (1 - t)``   (in [0.5 + eps, 1]: rounds to 1, "roadwork")

It is non-decreasing (a jump of ``eps`` at ``t``), maps [0, 1] into [0, 1], and the validator's rounding of it is
exactly stage 1's ``p >= t``. ``t`` is kept only when it generalises within val_select: thresholds fitted on four
fifths of its images must beat plain rounding on the fifth left out (pooled over five folds,
:func:`cross_validate_threshold`); otherwise ``t = 0.5`` (the remap is then plain p, except that 0.5 itself counts as
roadwork). On a small demo run the in-sample optimum overfitted 47 images (benchmarks/RESULTS.md).

An image stage 1 would defer gets no special value: it lands on the side of ``t`` its p is on, which is the
reward-optimal guess for an image the miner must decide. An image that cannot be read answers
:data:`FALLBACK` (0.5: "no roadwork" after rounding, a defined float, never an exception).

``roadwork export --natix DIR`` writes, with :func:`write_natix_miner`:

- ``roadwork_stage1.tar`` (the verified bundle) and ``natix_remap.json`` (``t``, ``eps``, the mix, the val_select
  reward before and after the remap);
- ``base_miner/detectors/roadwork_stage1_detector.py``: a ``FeatureDetector`` registered as ``ROADWORK_STAGE1`` (the
  subnet's own ``roadwork_detector.py`` / ``ROADWORK`` stay untouched), and its YAML config under
  ``base_miner/detectors/configs/``;
- ``model_card.json`` with the fields the subnet asks for (placeholders to fill in) and ``README.md`` with the steps.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:
    from roadwork_cli.config import Settings

REGISTRY_NAME = "ROADWORK_STAGE1"
"""The detector's ``DETECTOR_REGISTRY`` name (the subnet ships ``ROADWORK``; this one cannot collide with it)."""
MODULE_NAME = "roadwork_stage1_detector"
CONFIG_NAME = "roadwork_stage1.yaml"
BUNDLE_NAME = "roadwork_stage1.tar"
REMAP_NAME = "natix_remap.json"
EPSILON = 1e-3
"""How far above 0.5 the threshold maps: far enough that float noise never rounds it down."""
FALLBACK = 0.5
"""The answer for an image that cannot be read: a float in [0, 1] that the validator rounds to "no roadwork"."""


@dataclass(frozen=True)
class NatixRemap:
    """Monotone map of calibrated p onto the validator's scale (module docstring).

    Attributes:
        threshold: ``t`` in (0, 1): stage 1's p at or above it is "roadwork" for the validator.
        epsilon: ``t`` maps to ``0.5 + epsilon``.
    """

    threshold: float
    epsilon: float = EPSILON

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"NATIX remap threshold must be in (0, 1), got {self.threshold}.")
        if not 0.0 < self.epsilon < 0.5:
            raise UsageError(f"NATIX remap epsilon must be in (0, 0.5), got {self.epsilon}.")

    def __call__(self, p: Any) -> Any:
        """The validator-facing float(s) of calibrated ``p`` (scalar or array; clipped to [0, 1] first)."""
        x = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
        t, eps = self.threshold, self.epsilon
        low = 0.5 * x / t
        high = 0.5 + eps + (0.5 - eps) * (x - t) / (1.0 - t)
        out = np.clip(np.where(x >= t, high, low), 0.0, 1.0)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> NatixRemap:
        return cls(float(record["threshold"]), float(record.get("epsilon", EPSILON)))


# ----------------------------------------------------------------------------------------------- the reward
def weighted_reward(decision: np.ndarray, label: np.ndarray, weight: np.ndarray) -> float:
    """``(0.5 * MCC + 0.5 * accuracy) ** 3`` of 0/1 decisions, each image counted with its weight."""
    d, y, w = (np.asarray(a, dtype=np.float64) for a in (decision, label, weight))
    tp, fp = float(np.sum(w * d * y)), float(np.sum(w * d * (1 - y)))
    fn, tn = float(np.sum(w * (1 - d) * y)), float(np.sum(w * (1 - d) * (1 - y)))
    return _reward(tp, fp, fn, tn)


def _reward(tp: float, fp: float, fn: float, tn: float) -> float:
    total = tp + fp + fn + tn
    accuracy = (tp + tn) / total if total > 0 else 0.0
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denominator if denominator > 0 else 0.0  # undefined MCC counts as 0, as sklearn's
    return float((0.5 * mcc + 0.5 * accuracy) ** 3)


def optimal_threshold(p: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None) -> tuple[float, float]:
    """The threshold ``t`` on p whose decision ``p >= t`` maximises the weighted NATIX reward, and that reward.

    Every cut between two distinct p values is tried (all images positive and all negative included); ``t`` is the
    midpoint of the best cut's neighbours, so it does not sit on a calibration image's score. Ties keep the cut
    closest to 0.5 (the least change from the identity).
    """
    p = np.asarray(p, dtype=np.float64)
    label = np.asarray(label, dtype=np.float64)
    weight = np.ones_like(p) if weight is None else np.asarray(weight, dtype=np.float64)
    keep = np.isfinite(p)
    p, label, weight = p[keep], label[keep], weight[keep]
    if p.size == 0:
        raise UsageError("No scored images to place the NATIX threshold on.")
    order = np.argsort(-p, kind="stable")
    p, label, weight = p[order], label[order], weight[order]
    tp_cum = np.concatenate([[0.0], np.cumsum(weight * label)])  # predicted positive = the first k images
    fp_cum = np.concatenate([[0.0], np.cumsum(weight * (1 - label))])
    pos, neg = tp_cum[-1], fp_cum[-1]
    # Cuts only between distinct values: k images above the cut, k = 0 .. n where p[k-1] > p[k].
    cuts = [0] + [k for k in range(1, p.size) if p[k - 1] > p[k]] + [p.size]
    best: tuple[float, float, float] | None = None  # (reward, -distance to 0.5, t)
    for k in cuts:
        tp, fp = tp_cum[k], fp_cum[k]
        reward = _reward(tp, fp, pos - tp, neg - fp)
        upper = p[k - 1] if k > 0 else 1.0
        lower = p[k] if k < p.size else 0.0
        t = float(np.clip((upper + lower) / 2.0, 1e-6, 1 - 1e-6))
        candidate = (round(reward, 12), -abs(t - 0.5), t)
        if best is None or candidate > best:
            best = candidate
    return best[2], float(best[0])


def level_weights(levels: dict[int, int], mix: tuple[float, ...]) -> dict[int, float]:
    """Per-image weight of each level so that a level's images together weigh its probability in the mix."""
    return {level: (mix[level] / n if n else 0.0) for level, n in levels.items()}


def fit_remap(
    run: Any, settings: Settings, progress: bool = False, held_out: str | None = "test"
) -> tuple[NatixRemap, dict[str, Any]]:
    """Place the remap's threshold on val_select under the NATIX challenge mix, and measure it.

    Scores val_select at NATIX levels 0-3 (``robustness.score_levels``, cached under ``eval/robustness/val_select``),
    calibrates them with the run's rule, weights each level by ``data.natix_levels`` and finds the reward-optimal
    threshold on calibrated p.

    Args:
        run: The trained and calibrated run directory.
        settings: Resolved settings (``data.natix_levels``, runtime, predict batch size and workers).
        progress: Show a progress bar per level.
        held_out: A split to measure the chosen remap on as well (None: none); skipped when it holds no images.

    Returns:
        The remap, and a record: the mix, the threshold, and for val_select (where ``t`` was chosen: in-sample) and
        the held-out split, per level and over all levels (weighted by the mix), the reward of the validator's
        rounding of plain calibrated p and of the remapped p (``p >= t``).
    """
    from roadwork_cli.calibration.api import load_run_calibration
    from roadwork_cli.data.splits import Splits
    from roadwork_cli.io.run import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    rule = load_run_calibration(run)
    mix = tuple(float(x) for x in settings.data.natix_levels)
    p, label, weight, level_of, ids = _mixed_levels(run, settings, rule, mix, "val_select", progress)
    threshold, _ = optimal_threshold(p, label, weight)
    check = cross_validate_threshold(p, label, weight, ids)
    if not check["keep"]:
        threshold = 0.5  # the fitted threshold did not beat plain rounding on val_select's own held-out folds
    remap = NatixRemap(threshold)
    record: dict[str, Any] = {
        "split": "val_select",
        "natix_levels": list(mix),
        "threshold": threshold,
        "fitted_threshold": check["fitted"] if "fitted" in check else threshold,
        "cross_validation": check,
    }
    record.update(_rewards(remap, p, label, weight, level_of))
    if held_out and Splits.load(run.require(run.splits, "split")).ids(held_out):
        scores = _mixed_levels(run, settings, rule, mix, held_out, progress)
        record["held_out"] = {"split": held_out, **_rewards(remap, *scores[:4])}
    return remap, record


def cross_validate_threshold(
    p: np.ndarray, label: np.ndarray, weight: np.ndarray, ids: np.ndarray, folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Whether a fitted threshold beats plain rounding (t = 0.5) on images it was not fitted on.

    Images (all their challenge views together) are dealt into ``folds`` folds; each fold's views are decided by the
    threshold fitted on the other folds, and the pooled out-of-fold decisions are scored once, against the validator's
    rounding of the same p. ``keep`` is true only when the fitted thresholds score strictly higher: with few
    val_select images the reward-optimal cut overfits them, and then plain rounding is the safer answer.
    """
    unique = np.unique(ids.astype(str))
    fitted, _ = optimal_threshold(p, label, weight)
    if unique.size < 2 * folds:
        return {"folds": 0, "keep": False, "fitted": fitted, "reason": f"only {unique.size} images"}
    rng = np.random.default_rng(seed)
    fold_of_image = dict(zip(rng.permutation(unique), np.arange(unique.size) % folds, strict=True))
    fold = np.array([fold_of_image[i] for i in ids.astype(str)])
    decided = np.zeros_like(p)
    for k in range(folds):
        train = fold != k
        t, _ = optimal_threshold(p[train], label[train], weight[train])
        decided[~train] = (p[~train] >= t).astype(float)
    plain = (np.round(p) >= 1).astype(float)
    fitted_reward = weighted_reward(decided, label, weight)
    plain_reward = weighted_reward(plain, label, weight)
    return {
        "folds": folds,
        "fitted": fitted,
        "reward_fitted_out_of_fold": round(fitted_reward, 6),
        "reward_plain_p": round(plain_reward, 6),
        "keep": bool(fitted_reward > plain_reward),
    }


def _mixed_levels(run: Any, settings: Settings, rule: Any, mix: tuple[float, ...], split: str, progress: bool):
    """Calibrated p, labels, mix weights, level and image id of every scored (image, level) of ``split``, (N,) each."""
    from roadwork_cli.robustness import LEVELS, score_levels

    tables = score_levels(run, settings, split=split, progress=progress)
    counts = {level: int(np.isfinite(tables[level].p).sum()) for level in LEVELS}
    per_image = level_weights(counts, mix)
    ps, labels, weights, level_of, ids = [], [], [], [], []
    for level in LEVELS:
        table = tables[level]
        finite = np.isfinite(table.p)
        p_cal, _ = rule.calibrate(table.p[finite], table.gate[finite])
        ps.append(np.asarray(p_cal, dtype=np.float64))
        labels.append(table.label[finite].astype(np.float64))
        weights.append(np.full(int(finite.sum()), per_image[level]))
        level_of.append(np.full(int(finite.sum()), level))
        ids.append(np.asarray(table.ids if table.ids else range(len(table)), dtype=object)[finite])
    return tuple(np.concatenate(a) for a in (ps, labels, weights, level_of, ids))


def _rewards(remap: NatixRemap, p, label, weight, level_of) -> dict[str, Any]:
    """Reward of round(p) and of round(remap(p)) over all levels (mix-weighted) and per level."""
    from roadwork_cli.robustness import LEVELS

    out: dict[str, Any] = {}
    for name, pick in [("all_levels", np.ones_like(p, dtype=bool))] + [(f"level_{k}", level_of == k) for k in LEVELS]:
        if not pick.any():
            continue
        plain = (np.round(p[pick]) >= 1).astype(float)  # the validator's rounding of plain calibrated p
        remapped = (np.round(remap(p[pick])) >= 1).astype(float)
        out[name] = {
            "n": int(pick.sum()),
            "reward_plain_p": round(weighted_reward(plain, label[pick], weight[pick]), 6),
            "reward_remapped": round(weighted_reward(remapped, label[pick], weight[pick]), 6),
        }
    return out


# ----------------------------------------------------------------------------------------------- the detector's core
class NatixPredictor:
    """What the miner's detector calls: one PIL image in, one float in [0, 1] out, never an exception.

    Args:
        model: A loaded bundle (``load_bundle``).
        remap: The validator-facing remap.
    """

    def __init__(self, model: Any, remap: NatixRemap):
        self.model = model
        self.remap = remap

    @classmethod
    def from_files(
        cls, bundle: str | Path, remap_json: str | Path, device: str = "auto", runtime: str = "auto"
    ) -> NatixPredictor:
        """Load and verify ``bundle`` and read the remap.

        ``runtime`` as in ``load_bundle``: ``auto`` runs the bundle's ``model.onnx`` in onnxruntime (no torch) when it
        has one and the device is the CPU; ``onnx`` or ``torch`` forces one.
        """
        from roadwork_cli.stage1 import load_bundle

        device = "auto" if str(device) in ("cpu", "auto") else str(device)
        model = load_bundle(bundle, device=device, runtime=runtime)
        return cls(model, NatixRemap.from_dict(read_json(Path(remap_json))))

    def __call__(self, image: Any) -> float:
        """The remapped calibrated p of ``image`` (a PIL image, as the miner decodes the validator's JPEG)."""
        from PIL import Image

        if not isinstance(image, Image.Image):  # a string would be read as a path: only decoded images are scored
            return FALLBACK
        try:
            prediction = self.model.predict([image])[0]
            p = prediction.p_roadwork
            if prediction.error is not None or p is None or not math.isfinite(p):
                return FALLBACK
            return float(self.remap(p))
        except Exception:  # noqa: BLE001 - the miner must answer within its budget whatever the image is
            return FALLBACK


# ----------------------------------------------------------------------------------------------- the miner's files
DETECTOR_MODULE = '''"""NATIX StreetVision detector over a roadwork stage-1 bundle (`roadwork export --natix`).

Registered as {registry!r}; the subnet's own ROADWORK detector is left as it is. Needs `pip install roadwork-cli` in
the miner's environment (enough for a bundle with model.onnx; `roadwork-cli[train]` adds PyTorch for one without).
"""

from pathlib import Path

import yaml

try:  # the subnet's layout has moved between releases
    from natix.miner.detectors import FeatureDetector
    from natix.miner.registry import DETECTOR_REGISTRY
except ImportError:
    from base_miner.detectors import FeatureDetector
    from base_miner.registry import DETECTOR_REGISTRY

from roadwork_cli.natix import NatixPredictor

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@DETECTOR_REGISTRY.register_module(module_name={registry!r})
class RoadworkStage1Detector(FeatureDetector):
    """Stage 1's calibrated p(roadwork), remapped so that the validator's rounding is the reward-optimal decision."""

    def __init__(self, model_name: str = {registry!r}, config_name: str = {config!r}, device: str = "cpu"):
        self.config_name = config_name
        super().__init__(model_name, config_name, device)

    def load_model(self):
        config_path = CONFIG_DIR / self.config_name
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        resolve = lambda value: Path(value) if Path(value).is_absolute() else config_path.parent / value  # noqa: E731
        self.predictor = NatixPredictor.from_files(
            resolve(config["bundle"]),
            resolve(config["remap"]),
            device=getattr(self, "device", "cpu"),
            runtime=config.get("runtime", "auto"),
        )

    def __call__(self, image) -> float:
        return self.predictor(image)
'''

DETECTOR_CONFIG = """# roadwork stage-1 detector for NATIX StreetVision (written by `roadwork export --natix`).
# Paths are relative to this file unless absolute.
bundle: {bundle}
remap: {remap}
# auto: the bundle's model.onnx in onnxruntime (no torch) when it has one; onnx or torch forces one.
runtime: auto
"""


def write_natix_miner(
    run: Any, out_dir: Path, settings: Settings, bundle: Path | None = None, progress: bool = False
) -> dict[str, Any]:
    """Write the miner's files into ``out_dir`` (module docstring) and return a summary.

    Args:
        run: The trained and calibrated run directory.
        out_dir: Where to write (created).
        settings: Resolved settings (the NATIX mix, the export options).
        bundle: An already exported bundle to copy; None exports one into ``out_dir``.
        progress: Show progress bars while val_select is scored.
    """
    from roadwork_cli.io.run import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / BUNDLE_NAME
    if bundle is None:
        from roadwork_cli.export import export_bundle

        export_bundle(run, target, settings)
    elif Path(bundle).resolve() != target.resolve():
        shutil.copyfile(bundle, target)
    remap, record = fit_remap(run, settings, progress=progress)
    atomic_write_json(out_dir / REMAP_NAME, {**remap.to_dict(), "measured": record})

    detectors = out_dir / "base_miner" / "detectors"
    configs = detectors / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    module = detectors / f"{MODULE_NAME}.py"
    atomic_write_text(module, DETECTOR_MODULE.format(registry=REGISTRY_NAME, config=CONFIG_NAME))
    # The bundle and remap stay at the top of out_dir; the config points back to them relatively.
    atomic_write_text(
        configs / CONFIG_NAME, DETECTOR_CONFIG.format(bundle=f"../../../{BUNDLE_NAME}", remap=f"../../../{REMAP_NAME}")
    )
    atomic_write_json(
        out_dir / "model_card.json",
        {
            "model_name": "<your model name, e.g. roadwork-stage1-efficientnet-lite0>",
            "description": "roadwork stage 1 (calibrated selective head over a frozen backbone), remapped for the "
            f"NATIX validator: p >= {remap.threshold:.4f} answers > 0.5.",
            "version": "<your version, e.g. 1.0.0>",
            "submitted_by": "<your Hugging Face user or hotkey>",
            "submission_time": "<unix time of submission, e.g. 1767225600>",
        },
    )
    atomic_write_text(out_dir / "README.md", _readme(remap, record))
    return {
        "out_dir": str(out_dir),
        "registry_name": REGISTRY_NAME,
        "module": str(module),
        "threshold": remap.threshold,
        "measured": record,
    }


def _readme(remap: NatixRemap, record: dict[str, Any]) -> str:
    mix = record.get("natix_levels")
    blocks = [("val_select (in-sample)", record)]
    if isinstance(record.get("held_out"), dict):
        blocks.append((f"{record['held_out']['split']} (held out)", record["held_out"]))
    rows = "\n".join(
        f"| {split} | {name} | {r['n']} | {r['reward_plain_p']:.4f} | {r['reward_remapped']:.4f} |"
        for split, block in blocks
        for name, r in block.items()
        if isinstance(r, dict) and "n" in r and "reward_remapped" in r
    )
    return f"""# roadwork stage 1 as a NATIX StreetVision miner

Written by `roadwork export --natix`. The detector answers a monotone remap of stage 1's calibrated p(roadwork)
(threshold kept after cross-validation on val_select: {record.get("cross_validation", {}).get("keep")}):
p >= {remap.threshold:.6f} (the NATIX-reward-optimal threshold on val_select under the challenge mix {mix}) maps to
>= {0.5 + remap.epsilon:.4f}, so the validator's rounding decides exactly as that threshold does; an image stage 1
would defer lands on the side its p is on; an unreadable image answers {FALLBACK}.

| split | images | n | reward of round(p) | reward of round(remapped p) |
|---|---|---|---|---|
{rows}

## Steps

1. In the miner's environment: `pip install roadwork-cli` (inference only: onnxruntime, no torch, enough for this
   bundle when it holds model.onnx; `pip install 'roadwork-cli[train]'` adds PyTorch for one without).
2. Copy `base_miner/detectors/{MODULE_NAME}.py` into the subnet checkout's detectors package (next to
   `roadwork_detector.py`, which stays as it is), and `base_miner/detectors/configs/{CONFIG_NAME}` into its
   `configs/` folder. Keep `{BUNDLE_NAME}` and `{REMAP_NAME}` where the config's relative paths find them, or edit
   `bundle:` and `remap:` to absolute paths.
3. Import the module where the detectors package imports its detectors
   (`from .{MODULE_NAME} import RoadworkStage1Detector`), so that `{REGISTRY_NAME}` is registered.
4. Point the miner at it: its image detector setting (e.g. `--neuron.image_detector {REGISTRY_NAME}` with
   `--neuron.image_detector_config {CONFIG_NAME}`).
5. Fill in `model_card.json` (model_name, version, submitted_by, submission_time) before you submit.
6. Check it once: `python -c "from PIL import Image; from {MODULE_NAME} import RoadworkStage1Detector as D;
   print(D()(Image.open('street.jpg')))"` from the detectors folder prints one float in [0, 1].
"""
