"""Probability scaling of binary scores, fit on val_select: identity, temperature, Platt, Dirichlet (ODIR).

Every scaler maps probabilities to probabilities, is fit by maximum likelihood with scipy's L-BFGS, and round-trips
through plain JSON (``to_dict`` / ``scaler_from_dict``), never pickle.

Example:
    >>> scaler = create_scaler("temperature").fit(p_select, y_select)
    >>> p = scaler.transform(p_test)
    >>> scaler_from_dict(scaler.to_dict()).transform(p_test)  # same values
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from roadwork_cli.registry import Registry

_EPS = 1e-7


def _clip(p) -> np.ndarray:
    return np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)


def logit(p) -> np.ndarray:
    """log(p / (1 - p)) with p clipped away from 0 and 1."""
    p = _clip(p)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    """Numerically stable logistic function."""
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _nll_and_grad_z(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary NLL of logits ``z`` and its gradient with respect to ``z``."""
    # log(1 + exp(z)) - y z, written with logaddexp for stability.
    loss = np.mean(np.logaddexp(0.0, z) - y * z)
    return float(loss), (sigmoid(z) - y) / z.size


class Scaler:
    """Base class: ``fit(p, y) -> self``, ``transform(p) -> p'``, ``to_dict()``; parameters live in ``params``."""

    name: ClassVar[str] = "none"

    def __init__(self, **params: float):
        self.params: dict[str, float] = {k: float(v) for k, v in params.items()}

    def fit(self, probs, labels) -> Scaler:
        """Fit on probabilities (N,) and 0/1 labels (N,); returns self."""
        return self

    def transform(self, probs) -> np.ndarray:
        """Map probabilities (N,) to calibrated probabilities (N,)."""
        return np.asarray(probs, dtype=float).copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description: ``{"method": name, "params": {...}}``."""
        return {"method": self.name, "params": dict(self.params)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def _check_fit_inputs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=float).reshape(-1)
    labels = np.asarray(labels, dtype=float).reshape(-1)
    if probs.shape != labels.shape or probs.size == 0:
        raise ValueError("scaling needs equally long, non-empty probability and label arrays")
    return probs, labels


def _minimize(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    result = minimize(objective, x0, jac=True, method="L-BFGS-B")
    return np.asarray(result.x, dtype=float)


class IdentityScaler(Scaler):
    """No scaling (the probabilities are used as they are)."""

    name = "none"


class TemperatureScaler(Scaler):
    """p' = sigmoid(logit(p) / T), one parameter T > 0 (fit as log T so it stays positive)."""

    name = "temperature"

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature=temperature)

    def fit(self, probs, labels) -> TemperatureScaler:
        probs, labels = _check_fit_inputs(probs, labels)
        z = logit(probs)

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            inv_t = np.exp(-x[0])
            loss, grad_z = _nll_and_grad_z(z * inv_t, labels)
            return loss, np.array([np.sum(grad_z * z) * -inv_t])

        (log_t,) = _minimize(objective, np.zeros(1))
        self.params = {"temperature": float(np.exp(log_t))}
        return self

    def transform(self, probs) -> np.ndarray:
        return sigmoid(logit(probs) / self.params["temperature"])


class PlattScaler(Scaler):
    """p' = sigmoid(a * logit(p) + b), the logistic regression of the label on logit(p)."""

    name = "platt"

    def __init__(self, a: float = 1.0, b: float = 0.0):
        super().__init__(a=a, b=b)

    def fit(self, probs, labels) -> PlattScaler:
        probs, labels = _check_fit_inputs(probs, labels)
        z = logit(probs)
        if np.unique(labels).size < 2:
            # One class only: the MLE runs off to infinity; keep the identity map rather than a degenerate one.
            self.params = {"a": 1.0, "b": 0.0}
            return self

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            loss, grad_z = _nll_and_grad_z(x[0] * z + x[1], labels)
            return loss, np.array([np.sum(grad_z * z), np.sum(grad_z)])

        a, b = _minimize(objective, np.array([1.0, 0.0]))
        self.params = {"a": float(a), "b": float(b)}
        return self

    def transform(self, probs) -> np.ndarray:
        return sigmoid(self.params["a"] * logit(probs) + self.params["b"])


class DirichletScaler(Scaler):
    """Dirichlet calibration for two classes with ODIR regularisation (Kull et al., 2019).

    The full map is softmax(W log q + c) with q = (p, 1 - p), W 2x2 and c of length 2. Its binary logit is
    ``w1 * log p + w2 * log(1 - p) + b`` with w1 = W00 - W10, w2 = W01 - W11, b = c0 - c1. ODIR penalises the
    off-diagonal entries of W and the intercepts; minimising that penalty over the full parameters that give the
    same (w1, w2, b) leaves W10 = W01 = 0 and c = (b/2, -b/2), so the penalty reduces to ``l2 * b^2 / 2``.
    """

    name = "dirichlet"

    def __init__(self, w1: float = 1.0, w2: float = -1.0, b: float = 0.0, l2: float = 1e-2):
        super().__init__(w1=w1, w2=w2, b=b, l2=l2)

    @staticmethod
    def _features(probs) -> tuple[np.ndarray, np.ndarray]:
        p = _clip(probs)
        return np.log(p), np.log1p(-p)

    def fit(self, probs, labels) -> DirichletScaler:
        probs, labels = _check_fit_inputs(probs, labels)
        lp, lq = self._features(probs)
        l2 = self.params.get("l2", 1e-2)
        if np.unique(labels).size < 2:
            self.params = {"w1": 1.0, "w2": -1.0, "b": 0.0, "l2": l2}
            return self

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            loss, grad_z = _nll_and_grad_z(x[0] * lp + x[1] * lq + x[2], labels)
            grad = np.array([np.sum(grad_z * lp), np.sum(grad_z * lq), np.sum(grad_z) + l2 * x[2]])
            return loss + 0.5 * l2 * x[2] ** 2, grad

        w1, w2, b = _minimize(objective, np.array([1.0, -1.0, 0.0]))
        self.params = {"w1": float(w1), "w2": float(w2), "b": float(b), "l2": float(l2)}
        return self

    def transform(self, probs) -> np.ndarray:
        lp, lq = self._features(probs)
        return sigmoid(self.params["w1"] * lp + self.params["w2"] * lq + self.params["b"])


SCALERS: Registry[type[Scaler]] = Registry("probability scaler")
for _scaler in (IdentityScaler, TemperatureScaler, PlattScaler, DirichletScaler):
    SCALERS.add(_scaler.name, _scaler)


def list_scalers() -> list[str]:
    """Names accepted by ``create_scaler``."""
    return SCALERS.names()


def create_scaler(name: str, **params: float) -> Scaler:
    """A new, unfitted scaler by name (``none``, ``temperature``, ``platt``, ``dirichlet``).

    Raises:
        UnknownNameError: No such scaler.
    """
    return SCALERS.get(name)(**params)


def scaler_from_dict(spec: dict[str, Any] | None) -> Scaler:
    """Rebuild a fitted scaler from ``to_dict()`` output; ``None`` gives the identity."""
    if not spec:
        return IdentityScaler()
    return create_scaler(str(spec.get("method", "none")), **dict(spec.get("params") or {}))


def softmax_response(p) -> np.ndarray:
    """max(p, 1 - p): the confidence of the 0.5-threshold decision, a gate-free selection score."""
    p = np.asarray(p, dtype=float)
    return np.maximum(p, 1.0 - p)


def fit_gate_scaler(method: str, gate_raw, p_calibrated, labels) -> Scaler:
    """Calibrate the gate as P(cls decision right): fit ``method`` on the gate against 1[(p >= 0.5) == y]."""
    correct = ((np.asarray(p_calibrated) >= 0.5).astype(int) == np.asarray(labels).astype(int)).astype(float)
    return create_scaler(method).fit(gate_raw, correct)
