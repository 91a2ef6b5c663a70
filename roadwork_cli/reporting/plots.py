"""Plots of an evaluation (PNG, matplotlib's Agg backend, imported lazily so the CLI starts fast).

Each function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork_cli.io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: no display is needed or touched
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_risk_coverage(
    path: Path,
    scores: dict[str, np.ndarray],
    losses: np.ndarray,
    operating_point: tuple[float, float] | None = None,
    xi: float | None = None,
) -> Path:
    """Risk-coverage curves of one or more selection scores, with the chosen operating point and the target xi.

    The operating point is the rule's actual exit rate and error on exits; it lies on a curve only when the rule
    exits a top-k set of that curve's score (the band rule, or a gate rule whose tau differs from the curve's
    decision, need not).
    """
    from roadwork_cli.metrics.selective import aurc, risk_coverage_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # Curves often overlap (the gate may be nearly max(p, 1 - p)): colour, dash, width and markers tell them apart.
    styles = (
        {"color": "tab:blue", "linestyle": "-", "linewidth": 2.2, "marker": "o"},
        {"color": "tab:orange", "linestyle": "--", "linewidth": 1.4, "marker": "s"},
        {"color": "tab:green", "linestyle": ":", "linewidth": 1.4, "marker": "^"},
    )
    for (name, score), style in zip(scores.items(), styles * len(scores), strict=False):
        curve = risk_coverage_curve(score, losses)
        every = max(curve.coverage.size // 8, 1)
        ax.step(curve.coverage, curve.risk, where="post", markevery=every, markersize=5, fillstyle="none",
                label=f"{name} (AURC {aurc(score, losses):.4f})", **style)  # fmt: skip
    if operating_point is not None:
        ax.plot(*operating_point, "*", color="crimson", markersize=13, zorder=5,
                label="stage 1's operating point (its exits)")  # fmt: skip
    if xi is not None:
        ax.axvline(xi, color="grey", linestyle="--", linewidth=1, label=f"coverage target {xi:g}")
    ax.set_xlabel("coverage (fraction exiting stage 1)")
    ax.set_ylabel("selective risk (error on exits)")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_reliability(path: Path, labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> Path:
    """Reliability diagram of calibrated p(roadwork): observed positive rate per equal-width bin."""
    from roadwork_cli.metrics.classification import ece, reliability_bins

    plt = _pyplot()
    bins = reliability_bins(labels, probs, n_bins)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    filled = bins.counts > 0
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    ax.bar(centres[filled], bins.frac_pos[filled], width=1.0 / n_bins, alpha=0.6, edgecolor="black", label="observed")
    ax.plot(bins.mean_prob[filled], bins.frac_pos[filled], "o-", color="crimson", markersize=4, label="mean p")
    ax.set_xlabel("predicted p(roadwork)")
    ax.set_ylabel("fraction roadwork")
    ax.set_title(f"ECE {ece(labels, probs, n_bins):.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, Path(path))


def plot_score_histograms(path: Path, labels: np.ndarray, p: np.ndarray, g: np.ndarray, rule: Any = None) -> Path:
    """Histograms of calibrated p and of the selection score per class, with the rule's thresholds marked.

    Gate rule: tau on p, lambda on g. Band rule: tau and b on p (everything between them defers).
    """
    plt = _pyplot()
    labels = np.asarray(labels).astype(int)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    band = getattr(rule, "rule", "gate") == "band"
    p_marks = {"tau": getattr(rule, "tau", None)} | ({"b": getattr(rule, "b", None)} if band else {})
    g_marks = {} if band else {"lambda": getattr(rule, "lam", None)}
    for ax, values, name, marks in (
        (axes[0], p, "calibrated p(roadwork)", p_marks),
        (axes[1], g, "selection score g", g_marks),
    ):
        bins = np.linspace(float(np.min(values)), float(np.max(values)) + 1e-9, 31)
        for cls, colour, label in ((0, "tab:blue", "no_roadwork"), (1, "tab:orange", "roadwork")):
            ax.hist(values[labels == cls], bins=bins, alpha=0.55, color=colour, label=label)
        for (mark, threshold), style in zip(marks.items(), ("--", ":"), strict=False):
            if threshold is not None and np.isfinite(threshold):
                ax.axvline(threshold, color="crimson", linestyle=style, label=f"{mark} {threshold:.3f}")
        ax.set_xlabel(name)
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_examples(path: Path, records: list[dict[str, Any]], columns: int = 6, max_side: int = 160) -> Path | None:
    """A grid of example images (missed roadwork, false alarms, deferred); unreadable images are skipped.

    Returns None when no image could be loaded.
    """
    try:
        from roadwork_cli.data.images import load_image
    except ImportError:
        return None
    loaded = []
    for record in records:
        try:
            image = load_image(record["locator"])
        except Exception:  # noqa: BLE001 - a missing or bad image only drops this tile
            continue
        image.thumbnail((max_side, max_side))
        loaded.append((record, np.asarray(image)))
    if not loaded:
        return None
    plt = _pyplot()
    rows = (len(loaded) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (record, pixels) in zip(axes.ravel(), loaded, strict=False):
        ax.imshow(pixels)
        # 4 significant digits: two images near a threshold (p = 0.0502 vs 0.0498) must not print alike.
        ax.set_title(f"{record['kind']}\np={record['p']:.4g} g={record['g']:.4g}", fontsize=7)
    return _save(fig, Path(path))
