"""Group-level statistics: the arithmetic of groups and the validity of the Hoeffding-Bentkus p-values."""

import numpy as np
import pytest

from roadwork_cli.calibration.groups import (
    GroupIndex,
    coverage_pvalues,
    fixed_sequence_prefix,
    groups_entered,
    hoeffding_bentkus_pvalue,
    risk_pvalues,
)
from roadwork_cli.calibration.stats import binomial_pvalue


def test_group_index_counts_groups_and_the_largest_and_keeps_unlabelled_images_apart():
    groups = GroupIndex.from_labels(["a", "b", "a", None, "", "a"])
    assert groups.count == 4 and groups.largest == 3 and not groups.singletons
    assert groups.index[0] == groups.index[2] == groups.index[5] != groups.index[1]
    assert len({groups.index[3], groups.index[4]}) == 2  # two unlabelled images are two groups
    assert GroupIndex.from_labels(["x", "y"]).singletons


def test_groups_entered_counts_groups_with_any_image_below_tau():
    groups = GroupIndex.from_labels(["a", "a", "b", "c"])
    entry = np.array([0.3, 0.1, np.inf, -np.inf])  # group a enters at 0.1, b never, c always
    assert groups_entered(entry, groups, [0.0, 0.1, 0.2, 1.0]).tolist() == [1, 1, 2, 2]


def test_hoeffding_bentkus_is_never_sharper_than_the_exact_binomial_on_0_1_losses():
    k = np.arange(0, 12)
    exact = binomial_pvalue(k, 300, 0.02)
    assert np.all(hoeffding_bentkus_pvalue(k, 300, 0.02) >= exact - 1e-12)
    assert hoeffding_bentkus_pvalue(0, 0, 0.02) == 1.0


@pytest.mark.parametrize("rate", [0.02, 0.1])
def test_hoeffding_bentkus_p_values_are_valid_at_the_boundary_of_the_null(rate):
    # Losses in [0, 1] with mean exactly `rate` (a mixture of 0/1 and fractional losses): P(p <= level) <= level.
    rng = np.random.default_rng(0)
    n, draws, level = 400, 4000, 0.1
    fractional = rng.random((draws, n)) < 0.5
    losses = np.where(fractional, np.full((draws, n), rate), (rng.random((draws, n)) < rate).astype(float))
    pvalues = hoeffding_bentkus_pvalue(losses.sum(axis=1), n, rate)
    # Binomial slack: the rejection count may exceed level * draws only by chance (3 standard deviations).
    assert np.sum(pvalues <= level) <= level * draws + 3 * np.sqrt(draws * level * (1 - level))


def test_a_group_whose_frames_all_exit_without_a_miss_counts_as_one_image():
    # 300 groups of 5 exited positives, no miss, c = 5: the same evidence as 300 independent images under Bentkus.
    grouped = risk_pvalues(misses=0, exited_positives=1500, positive_groups=300, largest=5, alpha=0.02)
    single = risk_pvalues(misses=0, exited_positives=300, positive_groups=300, largest=1, alpha=0.02)
    assert grouped == pytest.approx(single) and grouped < 0.01


def test_misses_raise_the_risk_p_value_and_coverage_p_values_fall_with_more_exits():
    p = risk_pvalues(misses=np.array([0, 5, 30]), exited_positives=1000, positive_groups=200, largest=5, alpha=0.02)
    assert p[0] < p[1] < p[2] and p[2] == 1.0
    cov = coverage_pvalues(exits=np.array([900, 800, 700]), frames=1000, groups=200, largest=5, xi=0.7)
    assert cov[0] < cov[1] < cov[2]


def test_fixed_sequence_stops_at_the_first_non_rejection():
    assert fixed_sequence_prefix([0.01, 0.02, 0.5, 0.01], 0.05) == 2
    assert fixed_sequence_prefix([0.01, 0.02], 0.05) == 2
    assert fixed_sequence_prefix([0.3], 0.05) == 0
