"""Threshold grids, all fixed before val_calib is seen: lambda (gate rule), b (band rule) and tau candidates."""

from __future__ import annotations

import numpy as np


def gate_grid_from_scores(g_select, grid_size: int, low_level: float = 0.0, high_level: float = 1.0) -> np.ndarray:
    """Lambda grid = quantiles of the selection score on val_select at evenly spaced levels (fixed pre-val_calib).

    Level q gives an exit rate of about 1 - q, so ``[0, 1 - xi]`` spans every coverage at or above xi. The first
    value is replaced by -inf so that "everything exits" is always in the grid.
    """
    g_select = np.asarray(g_select, dtype=float)
    levels = np.linspace(low_level, high_level, grid_size)
    grid = np.unique(np.quantile(g_select, levels)) if g_select.size else np.linspace(0, 1, grid_size)
    grid[0] = -np.inf
    return grid


def fixed_gate_grid(grid_size: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Data-free lambda grid: ``grid_size`` evenly spaced values on [low, high) of the score scale (low -> -inf)."""
    grid = np.linspace(low, high, grid_size, endpoint=False)
    grid[0] = -np.inf
    return grid


def band_grid_from_scores(p_select, y_select, grid_size: int, xi: float, alpha: float, headroom: float = 2.0):
    """b grid = quantiles of calibrated p on val_select at ``grid_size`` evenly spaced levels (fixed pre-val_calib).

    With tau = 0 the band defers every p < b, so level ``1 - xi`` is the lowest useful b. A tau certified at FNR
    alpha gives back about F(tau) of mass, so the top level is ``1 - xi + F(t)`` with t the ``headroom * alpha``
    quantile of the val_select positives' p (a plug-in tau with room above it); the grid's points thus sit where
    the coverage constraint binds instead of being spread over the whole p range.

    Args:
        p_select: Calibrated p on val_select, shape (n,).
        y_select: Its 0/1 labels, shape (n,).
        grid_size: Number of levels (duplicates of tied quantiles are dropped).
        xi: Coverage the grid should reach (pass xi + DKW slack).
        alpha: FNR target.
        headroom: Multiple of alpha for the plug-in tau.
    """
    p_select = np.asarray(p_select, dtype=float)
    y_select = np.asarray(y_select).astype(int)
    if not p_select.size:
        return fixed_band_grid(grid_size)
    low = min(max(1.0 - xi, 0.0), 1.0)
    positives = p_select[y_select == 1]
    plug_in_tau = float(np.quantile(positives, min(headroom * alpha, 1.0))) if positives.size else 1.0
    high = min(low + float(np.mean(p_select < plug_in_tau)), 1.0)
    return np.unique(np.quantile(p_select, np.linspace(low, high, grid_size)))


def fixed_band_grid(grid_size: int, low: float = 0.5, high: float = 1.0) -> np.ndarray:
    """Data-free b grid: ``grid_size`` evenly spaced values on [low, high) of the p scale."""
    return np.linspace(low, high, grid_size, endpoint=False)


def tau_candidates(p) -> np.ndarray:
    """Candidate tau: 0, then midpoints between consecutive distinct p (ascending; each step adds misses)."""
    unique = np.unique(np.asarray(p, dtype=float))
    return np.concatenate([[0.0], (unique[:-1] + unique[1:]) / 2.0]) if unique.size else np.array([0.0])
