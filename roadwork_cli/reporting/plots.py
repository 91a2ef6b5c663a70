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

    Gate rule: tau on p, lambda on g. Band rule: tau and b on p (everything between them defers). ``rule`` is a
    ``SelectiveConformal``; thresholds a rule does not use are null and not drawn.
    """
    plt = _pyplot()
    labels = np.asarray(labels).astype(int)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    thresholds = rule.decision_rule.to_params() if rule is not None else {}
    p_marks = {name: thresholds.get(name) for name in ("tau", "b")}
    g_marks = {"lambda": thresholds.get("lambda")}
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


def plot_robustness(path: Path, block: dict[str, Any]) -> Path:
    """Metrics per NATIX challenge level (the ``robustness`` block of report.json), with the targets alpha and xi.

    A filled marker on the coverage and FNR lines means the targets held on that level, a hollow one that they did
    not; the guarantee itself is only promised for the calibration distribution.
    """
    plt = _pyplot()
    names = sorted(key for key in block if key.startswith("level_"))
    levels = [int(name.removeprefix("level_")) for name in names]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    series = (
        ("accuracy", "accuracy", "tab:blue", "-"),
        ("mcc", "MCC", "tab:purple", "-"),
        ("auroc", "AUROC", "tab:green", "-"),
        ("natix_reward", "NATIX reward (0.5 MCC + 0.5 acc)^3", "black", "-"),
        ("coverage", "coverage", "tab:orange", "--"),
        ("fnr_on_exits", "FNR on exits", "crimson", "--"),
    )
    held = [bool(block[name].get("satisfied")) for name in names]
    for key, label, colour, style in series:
        values = [block[name].get(key) for name in names]
        values = [np.nan if v is None else float(v) for v in values]
        ax.plot(levels, values, color=colour, linestyle=style, label=label)
        fill = [colour if ok or key not in ("coverage", "fnr_on_exits") else "white" for ok in held]
        ax.scatter(levels, values, color=fill, edgecolors=colour, zorder=3)
    guarantee = block[names[0]].get("guarantee", {}) if names else {}
    for target, label, colour in ((guarantee.get("xi"), "xi (coverage target)", "tab:orange"),
                                  (guarantee.get("alpha"), "alpha (FNR target)", "crimson")):  # fmt: skip
        if target is not None and np.isfinite(target):
            ax.axhline(target, color=colour, linestyle=":", linewidth=1, label=label)
    ax.set_xticks(levels)
    ax.set_xlabel("NATIX challenge level")
    ax.set_ylabel("value")
    ax.set_title("Stage 1 per NATIX challenge level (guarantee promised for clean data only)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, Path(path))
