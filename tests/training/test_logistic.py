"""The cls head's exact logistic regression: scikit-learn's solution, CV picks a sensible C, held-out val_select."""

from __future__ import annotations

import numpy as np
import torch
from train_helpers import make_cached_run, train_settings

from roadwork_cli.features.cache import load_cached, read_split_table
from roadwork_cli.training.api import train
from roadwork_cli.training.artifacts import load_best_head
from roadwork_cli.training.logistic import fit_logistic_cv


def _problem(n: int, dim: int, signal: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator).double()
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    x = (
        3 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
        + 5
        + signal * (2 * y[:, None] - 1) * direction
    )
    return x, y


def test_matches_scikit_learn_at_the_chosen_c():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _problem(200, 12, 0.3, seed=0)
    fit = fit_logistic_cv(x, y, folds=5, seed=0)
    z = StandardScaler().fit_transform(x.numpy())
    reference = LogisticRegression(C=fit.c, max_iter=10_000, tol=1e-10).fit(z, y.numpy())
    # Standardisation is folded into the raw-feature weights, so the logits must agree on the raw features.
    assert np.allclose(fit.logits(x).numpy(), reference.decision_function(z), atol=1e-4)


def test_cross_validation_regularises_noise_and_frees_signal():
    noise_x, noise_y = _problem(120, 40, 0.0, seed=1)
    signal_x, signal_y = _problem(120, 40, 1.0, seed=1)
    noise, signal = fit_logistic_cv(noise_x, noise_y), fit_logistic_cv(signal_x, signal_y)
    assert noise.c < signal.c  # labels unrelated to the features: the strongest penalties win the CV
    assert set(noise.cv_log_loss) == set(signal.cv_log_loss) and len(noise.cv_log_loss) == 13
    # Out-of-fold logits of pure noise carry no signal; those of a separable problem classify well.
    assert ((signal.oof_logits > 0).double() == signal_y).double().mean() > 0.9


def test_one_class_fit_does_not_crash():
    x, _ = _problem(30, 4, 0.0, seed=2)
    fit = fit_logistic_cv(x, torch.ones(30))
    assert fit.folds == 0 and bool((fit.logits(x) > 0).all())


def test_val_select_scores_are_held_out(tmp_path):
    run = make_cached_run(tmp_path / "run", counts=(120, 40, 20, 20), views=1, seed=5, signal=1.0)
    train(run, train_settings(run))
    head, _ = load_best_head(run)
    table, cached = read_split_table(run), load_cached(run)
    rows = {s: [cached.rows[i][0] for i in table.ids(s)] for s in ("val_select", "test")}
    with torch.no_grad():
        own = {s: torch.sigmoid(head(cached.features[r]).cls).numpy() for s, r in rows.items()}
    import csv

    def written(split: str) -> np.ndarray:
        with open(run.scores / f"{split}.csv", newline="") as handle:
            return np.array([float(r["p_roadwork"]) for r in csv.DictReader(handle)])

    assert np.allclose(written("test"), own["test"], atol=1e-6)  # test: the refit head's own scores
    # val_select: scored by the same pipeline fit on train alone, not by the final fit, which saw these images.
    assert np.abs(written("val_select") - own["val_select"]).max() > 1e-3


def test_logistic_cls_with_a_crossfit_gate_repeats_exactly(tmp_path):
    run = make_cached_run(tmp_path / "run", counts=(120, 40, 20, 20), views=1, seed=6, signal=1.0)
    settings = train_settings(run, epochs=2)
    settings.model.head_gate = "crossfit"
    train(run, settings)
    first = run.checkpoints.joinpath("best.safetensors").read_bytes()
    head, info = load_best_head(run)
    assert head.cls == "linear" and head.gate == "crossfit" and "logistic" in info.gate
    # A re-run after the epochs are done (as after SIGKILL) refits cls and gate deterministically: identical bytes.
    assert train(run, settings).resumed_from == 2
    assert run.checkpoints.joinpath("best.safetensors").read_bytes() == first
