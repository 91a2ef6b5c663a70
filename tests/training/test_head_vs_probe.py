"""The trained head learns what a linear probe learns on features whose classes a linear boundary separates best."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from train_helpers import make_cached_run, train_settings

from roadwork_cli.features.cache import load_cached, read_split_table
from roadwork_cli.metrics.classification import auroc
from roadwork_cli.training.trainer import train

AUROC_MARGIN = 0.01
"""Head AUROC >= probe AUROC - this, on 400 test images (the AUROC's own sampling sd here is ~0.012, but both
models score the same images, so their difference varies far less)."""


@pytest.mark.xfail(
    strict=True,
    reason="known gap (issue 10 open): the head reaches AUROC ~0.83-0.87 where the probe reaches 0.91 on this problem; "
    "benchmarks/head_vs_probe.py measures the same gap on efficientnet_lite0 features at n <= 1000",
)
def test_head_matches_a_logistic_regression_probe_on_gaussian_features(tmp_path):
    from sklearn.linear_model import LogisticRegressionCV

    # Two Gaussians 2 sd apart along one direction of 16: the Bayes boundary is linear, so the probe is near optimal.
    run = make_cached_run(tmp_path / "run", counts=(300, 60, 0, 400), views=0, seed=3, signal=1.0)
    settings = train_settings(run)
    # The best variant measured so far (standardise + LayerNorm, refit, >= 8 steps per epoch); defaults are worse.
    settings.train = type(settings.train)(refit=True, min_steps_per_epoch=8)
    settings.model.head_standardize = True
    train(run, settings)
    table = read_split_table(run)
    cached = load_cached(run)
    features = cached.features.numpy()

    def block(split: str) -> tuple[np.ndarray, np.ndarray]:
        ids = table.ids(split)
        return features[[cached.rows[i][0] for i in ids]], np.array([table.labels[i] for i in ids])

    x_fit, y_fit = (np.concatenate(parts) for parts in zip(block("train"), block("val_select"), strict=True))
    x_test, y_test = block("test")
    probe = LogisticRegressionCV(Cs=np.logspace(-3, 2, 11), cv=5, max_iter=2000).fit(x_fit, y_fit)
    probe_auroc = auroc(y_test, probe.predict_proba(x_test)[:, 1])
    with open(run.scores / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    head_auroc = auroc([int(r["label"]) for r in rows], [float(r["p_roadwork"]) for r in rows])
    assert 0.85 < probe_auroc < 0.99  # a problem where ranking quality is not saturated
    assert head_auroc >= probe_auroc - AUROC_MARGIN, (head_auroc, probe_auroc)
