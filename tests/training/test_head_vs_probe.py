"""The trained head learns what a linear probe learns on features whose classes a linear boundary separates best."""

from __future__ import annotations

import csv

import numpy as np
from train_helpers import make_cached_run, train_settings

from roadwork_cli.features.cache import load_cached, read_split_table
from roadwork_cli.metrics.classification import auroc
from roadwork_cli.training.api import train
from roadwork_cli.training.artifacts import load_best_head

AUROC_MARGIN = 0.005
"""Head AUROC >= probe AUROC - this, on 400 test images. The default head's cls is a cross-validated logistic
regression itself (on standardised features, another C grid than this unstandardised probe's), so only the C picked
separates them: measured 0.9076 vs 0.9070. The SGD-trained cls of wave 1 reached 0.83-0.87 here."""


def test_head_matches_a_logistic_regression_probe_on_gaussian_features(tmp_path):
    from sklearn.linear_model import LogisticRegressionCV

    # Two Gaussians 2 sd apart along one direction of 16: the Bayes boundary is linear, so the probe is near optimal.
    run = make_cached_run(tmp_path / "run", counts=(300, 60, 0, 400), views=0, seed=3, signal=1.0)
    settings = train_settings(run)  # the default train.cls_fit (logistic_cv)
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


def test_sgd_cls_fit_keeps_the_trunk_output(tmp_path):
    # train.cls_fit=sgd is the head trained by the loop alone: no linear cls layer, no cls_fit record.
    run = make_cached_run(tmp_path / "run", counts=(120, 40, 20, 20), views=0, seed=4)
    train(run, train_settings(run, cls_fit="sgd"))
    head, info = load_best_head(run)
    assert head.cls == "shared" and info.head["cls"] == "shared" and info.cls_fit is None
