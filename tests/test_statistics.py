"""Intervals and significance (:mod:`contrastive.app.statistics`) against scipy.stats and
closed forms on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from contrastive.app.statistics import (
    holm,
    indistinguishable_from_best,
    paired_t_test,
    t_interval,
)


@pytest.mark.parametrize("values", [[0.61, 0.64, 0.58], [1.0, 2.0, 4.0, 8.0, 3.5],
                                    [0.2, 0.25]])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_t_interval_matches_scipy(values, confidence):
    iv = t_interval(values, confidence)
    lo, hi = stats.t.interval(confidence, len(values) - 1, loc=np.mean(values),
                              scale=stats.sem(values))
    assert iv.n == len(values) and iv.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert iv.low == pytest.approx(lo, rel=1e-12) and iv.high == pytest.approx(hi, rel=1e-12)
    assert iv.half_width == pytest.approx((hi - lo) / 2, rel=1e-12)


def test_t_interval_closed_form_two_values():
    # n = 2: t_{0.975, 1} = tan(pi * 0.475) (Cauchy quantile), s / sqrt(2) = |a - b| / 2
    iv = t_interval([1.0, 3.0])
    assert iv.half_width == pytest.approx(math.tan(math.pi * 0.475) * 1.0, rel=1e-12)


def test_t_interval_edge_cases():
    one = t_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.half_width) and one.n == 1
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean)
    assert t_interval([0.5, float("nan"), 0.7]).n == 2  # non-finite values left out
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1, 2], confidence=95)


@pytest.mark.parametrize("seed", range(4))
def test_paired_t_test_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.6, 0.03, size=5)
    b = a - rng.normal(0.02, 0.02, size=5)
    t, p, n = paired_t_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert n == 5
    assert t == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-10)


def test_paired_t_test_degenerate_and_missing():
    assert paired_t_test([1, 2, 3], [1, 2, 3])[1] == 1.0  # identical
    assert paired_t_test([2, 3, 4], [1, 2, 3])[1] == 0.0  # a constant non-zero gap
    t, p, n = paired_t_test([1.0, None, 3.0, 5.0], [0.5, 2.0, 2.0, 5.5])  # seed 1 dropped
    ref = stats.ttest_rel([1.0, 3.0, 5.0], [0.5, 2.0, 5.5])
    assert n == 3 and p == pytest.approx(ref.pvalue, rel=1e-10)
    assert math.isnan(paired_t_test([1.0], [2.0])[1])


def test_holm_by_hand():
    # m = 4, alpha 0.05: thresholds 0.0125, 0.01667, 0.025, 0.05 on the sorted p-values
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    # 0.01 <= 0.0125, 0.015 <= 0.0167, 0.02 <= 0.025, 0.04 <= 0.05: all rejected
    assert holm([0.04, 0.015, 0.01, 0.02]) == [True, True, True, True]
    assert holm([0.2, float("nan")]) == [False, False]


def test_indistinguishable_from_best():
    per_seed = {
        "a": {0: 0.70, 1: 0.72, 2: 0.71},
        "b": {0: 0.69, 1: 0.73, 2: 0.70},  # a noisy tie with a
        "c": {0: 0.50, 1: 0.52, 2: 0.51},  # clearly worse, same seed pattern
        "d": {},                           # every cell failed
    }
    res = indistinguishable_from_best(per_seed)
    assert res["best"] == "a"
    assert res["indistinguishable"] == ["a", "b"]
    assert res["p_values"]["b"] == pytest.approx(stats.ttest_rel([.70, .72, .71],
                                                                 [.69, .73, .70]).pvalue)
    none = indistinguishable_from_best(per_seed, correction="none")
    assert none["indistinguishable"] == ["a", "b"]
    assert indistinguishable_from_best({})["best"] is None


def test_a_loss_with_failed_seeds_is_not_crowned_on_the_seeds_that_survived():
    """A loss that diverged on two of three seeds has a higher mean on its one surviving seed
    than the loss that finished all three: the best is the complete one, the partial one is
    listed as incomplete (and, with one common seed, cannot be told apart from it)."""
    per_seed = {
        "lucky": {0: 0.95, 1: float("nan"), 2: float("nan")},
        "steady": {0: 0.70, 1: 0.72, 2: 0.71},
        "worse": {0: 0.50, 1: 0.52, 2: 0.51},
    }
    res = indistinguishable_from_best(per_seed)
    assert res["best"] == "steady"
    assert res["incomplete"] == ["lucky"]
    assert "worse" not in res["indistinguishable"]  # tested on 3 seeds and rejected
    assert res["indistinguishable"] == ["steady", "lucky"]  # one common seed: no test
    # every loss lost the same seed: all are complete on the seeds that ran
    both = {"a": {0: 0.6, 1: 0.7, 2: None}, "b": {0: 0.8, 1: 0.9, 2: None}}
    res = indistinguishable_from_best(both)
    assert res["best"] == "b" and res["incomplete"] == []
