"""How hard is the synthetic data? A linear probe on frozen backbone features should land near 90-97 % accuracy.

Renders N scenes exactly as ``synthetic:N`` does (same seeds, same JPEG re-compression), extracts features with a
registered backbone (default: the offline ImageNet-pretrained ``efficientnet_lite0``) through its eval transform, and
reports the k-fold cross-validated accuracy of a standardised logistic regression.

Usage:
    python benchmarks/synthetic_probe.py --n 1500 --folds 5
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image


def render(
    n: int, seed: int, size: tuple[int, int], jpeg: bool
) -> tuple[list[Image.Image], np.ndarray, np.ndarray, float]:
    """The scenes, labels, roadwork area (share of the image covered by cue boxes) and mean render milliseconds."""
    from roadwork_cli.data.synthetic import _render, scene_seed

    images, labels, areas = [], [], []
    render_s = 0.0
    for index in range(n):
        label = index % 2
        image_seed = scene_seed(seed, index)
        started = time.perf_counter()
        image, boxes = _render(image_seed, label, size, None)
        render_s += time.perf_counter() - started
        areas.append(sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) / (size[0] * size[1]))
        if jpeg:  # the same quality rule as render_dataset
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=30 + image_seed % 66)
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        images.append(image)
        labels.append(label)
    return images, np.array(labels), np.array(areas), render_s / n * 1000


def features(images: list[Image.Image], backbone_name: str, batch_size: int) -> tuple[np.ndarray, float]:
    """``(N, D)`` pooled features and the mean milliseconds per image."""
    import torch

    from roadwork_cli.data.transforms import eval_transform
    from roadwork_cli.model.backbones import create_backbone

    torch.set_num_threads(2)
    backbone = create_backbone(backbone_name).eval()
    transform = eval_transform(backbone.preprocessing)
    out = []
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(im) for im in images[start : start + batch_size]])  # (B, 3, H, W)
            out.append(backbone(batch).float().numpy())  # (B, D)
    return np.concatenate(out), (time.perf_counter() - started) / len(images) * 1000


def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, float, np.ndarray]:
    """Mean and standard deviation of stratified k-fold accuracy of a standardised logistic regression, and the
    out-of-fold predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, x, y, cv=cv)
    return float(scores.mean()), float(scores.std()), cross_val_predict(model, x, y, cv=cv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500, help="Scenes to render (half per class).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--no-jpeg", action="store_true", help="Skip the JPEG re-compression of synthetic:N.")
    args = parser.parse_args()

    images, labels, areas, render_ms = render(args.n, args.seed, (320, 240), not args.no_jpeg)
    x, feature_ms = features(images, args.backbone, args.batch_size)
    mean, std, predicted = probe_accuracy(x, labels, args.folds, args.seed)
    correct = predicted == labels
    positives = labels == 1
    cuts = np.quantile(areas[positives], [1 / 3, 2 / 3])
    bins = np.digitize(areas, cuts)
    print(f"rendered {args.n} scenes: {render_ms:.1f} ms per scene")
    print(f"{args.backbone} features: {x.shape[1]} dims, {feature_ms:.1f} ms per image")
    print(f"linear probe {args.folds}-fold accuracy: {mean:.3f} +- {std:.3f}")
    print(f"  negatives: {correct[~positives].mean():.3f}")
    for k, name in enumerate(("smallest", "middle", "largest")):
        chosen = positives & (bins == k)
        print(f"  positives, {name} third of roadwork area ({areas[chosen].mean():.2%}): {correct[chosen].mean():.3f}")


if __name__ == "__main__":
    main()
