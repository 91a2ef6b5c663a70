from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork_cli.calibration.scaling import (
    create_scaler,
    fit_gate_scaler,
    list_scalers,
    logit,
    scaler_from_dict,
    sigmoid,
)
from roadwork_cli.errors import UnknownNameError
from roadwork_cli.metrics.classification import nll


def overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logit z, reported logit 3 z: a model that is far too sure of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    labels = (rng.random(n) < sigmoid(z)).astype(int)
    return sigmoid(3 * z), labels


def shifted_asymmetric(n: int = 4000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Reported p = sigmoid(1.5 log p_true - 0.5 log(1 - p_true) + 1): a Dirichlet-family distortion with bias."""
    rng = np.random.default_rng(seed)
    p_true = np.clip(rng.beta(0.7, 0.7, n), 1e-4, 1 - 1e-4)
    labels = (rng.random(n) < p_true).astype(int)
    return sigmoid(1.5 * np.log(p_true) - 0.5 * np.log1p(-p_true) + 1.0), labels


def test_registry() -> None:
    assert list_scalers() == ["dirichlet", "none", "platt", "temperature"]
    with pytest.raises(UnknownNameError, match="Unknown probability scaler .isotonic."):
        create_scaler("isotonic")


@pytest.mark.parametrize("name", ["temperature", "platt", "dirichlet"])
def test_scaling_reduces_nll_on_overconfident_scores(name: str) -> None:
    probs, labels = overconfident()
    scaler = create_scaler(name).fit(probs[:2000], labels[:2000])
    before = nll(labels[2000:], probs[2000:])
    after = nll(labels[2000:], scaler.transform(probs[2000:]))
    assert after < before - 0.05


def test_temperature_recovers_the_distortion() -> None:
    probs, labels = overconfident(20000)
    assert create_scaler("temperature").fit(probs, labels).params["temperature"] == pytest.approx(3.0, rel=0.1)


def test_platt_recovers_slope_and_intercept() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1.5, 20000)
    labels = (rng.random(z.size) < sigmoid(0.5 * z - 0.7)).astype(int)
    params = create_scaler("platt").fit(sigmoid(z), labels).params
    assert params["a"] == pytest.approx(0.5, abs=0.05)
    assert params["b"] == pytest.approx(-0.7, abs=0.07)


def test_dirichlet_beats_platt_on_an_asymmetric_distortion() -> None:
    probs, labels = shifted_asymmetric(20000)
    train, test = slice(0, 10000), slice(10000, None)
    platt = create_scaler("platt").fit(probs[train], labels[train])
    dirichlet = create_scaler("dirichlet").fit(probs[train], labels[train])
    assert nll(labels[test], dirichlet.transform(probs[test])) < nll(labels[test], platt.transform(probs[test]))
    lp = np.log(np.clip(probs, 1e-7, 1))
    assert np.isfinite(lp).all()


def test_identity_and_json_round_trip() -> None:
    probs, labels = overconfident(500)
    np.testing.assert_allclose(create_scaler("none").fit(probs, labels).transform(probs), probs)
    for name in list_scalers():
        fitted = create_scaler(name).fit(probs, labels)
        spec = json.loads(json.dumps(fitted.to_dict()))
        np.testing.assert_allclose(scaler_from_dict(spec).transform(probs), fitted.transform(probs))
    np.testing.assert_allclose(scaler_from_dict(None).transform(probs), probs)


def test_single_class_data_keeps_an_identity_map() -> None:
    probs = np.linspace(0.1, 0.9, 20)
    for name in ("platt", "dirichlet"):
        np.testing.assert_allclose(create_scaler(name).fit(probs, np.ones(20)).transform(probs), probs, atol=1e-6)


def test_gate_scaler_targets_decision_correctness() -> None:
    rng = np.random.default_rng(8)
    n = 5000
    gate = rng.random(n)
    correct = rng.random(n) < 0.5 + 0.45 * gate  # P(right) rises with the gate
    labels = rng.integers(0, 2, n)
    p = np.where(correct == (labels == 1), 0.8, 0.2)  # decision p >= 0.5 is right exactly where `correct`
    scaler = fit_gate_scaler("platt", gate, p, labels)
    calibrated = scaler.transform(gate)
    high, low = gate > 0.8, gate < 0.2
    assert calibrated[high].mean() == pytest.approx(correct[high].mean(), abs=0.05)
    assert calibrated[low].mean() == pytest.approx(correct[low].mean(), abs=0.05)
    assert np.all(np.diff(calibrated[np.argsort(gate)]) >= -1e-12)  # monotone map keeps the ranking


def test_logit_is_finite_at_the_edges() -> None:
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()
