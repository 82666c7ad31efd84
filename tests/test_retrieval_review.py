"""Review of the retrieval evaluation (retrieval metrics, k-NN search, weighted k-NN classifier,
``AccuracyCalculator``): edge cases checked against exact references.

* Embeddings whose float32 scores overflow (finite values, row norms near 1e19): squared L2
  distances or inner products become ``inf`` / ``NaN`` and the neighbours are garbage; every
  entry point now raises a ``ValueError`` that says so, and rescaling by a power of two (exact
  in float32) leaves every metric unchanged below the limit.
* The weighted k-NN classifier and ``AccuracyCalculator`` name the search that produced their
  numbers (``.backend``), as ``retrieval_metrics`` does.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from evaluation import AccuracyCalculator, knn, knn_classifier, retrieval_metrics
from evaluation.accuracy_calculator import KNN_METRICS

logging.getLogger("evaluation.accuracy_calculator").setLevel(logging.ERROR)


def _data(n=24, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 4, n)


# --------------------------------------------------------------------------------------------
# float32 score overflow


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_scores_overflowing_float32_are_a_clear_error(metric):
    x, y = _data()
    big = x * np.float32(2.0**63)  # finite float32, but 2**126 |x|^2 overflows
    assert np.isfinite(big).all()
    calls = [
        lambda: retrieval_metrics(big, y, metric=metric),
        lambda: knn(big, None, 3, metric=metric, exclude_self=True),
        lambda: knn(big, big[:3], 3, metric=metric, backend="torch"),
        lambda: knn_classifier(big, y, big, y, k=5, metric=metric),
        lambda: AccuracyCalculator(include=KNN_METRICS, metric=metric).get_accuracy(big, y),
        lambda: AccuracyCalculator(include=("precision_at_1",), k="max_bin_count",
                                   metric=metric).get_accuracy(big, y),
        lambda: retrieval_metrics(big, y, metric=metric, index="ivf",
                                  index_options={"nlist": 1, "nprobe": 1}),
    ]
    if metric == "l2":  # (|q| + |r|)^2 overflows with one large side already
        calls += [lambda: retrieval_metrics(x[:4], y[:4], big, y, metric=metric, ks=1),
                  lambda: knn_classifier(big, y, x, y, k=5, metric=metric)]
    for call in calls:
        with pytest.raises(ValueError, match="overflow float32"):
            call()
    if metric == "ip":  # q.r stays finite with one side small: scores scale exactly by 2**63
        s_big, i_big = knn(x, big, 3, metric="ip")
        s_ref, i_ref = knn(x, x, 3, metric="ip")
        np.testing.assert_array_equal(i_big, i_ref)
        np.testing.assert_array_equal(s_big, s_ref * np.float32(2.0**63))


def test_cosine_of_huge_embeddings_is_fine():
    x, y = _data()
    big = x * np.float32(2.0**63)  # exact scaling: the normalised rows are bitwise equal
    assert retrieval_metrics(big, y, metric="cosine") == retrieval_metrics(x, y, metric="cosine")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_power_of_two_scale_below_the_limit_changes_nothing(metric):
    # scaling by 2**40 is exact in float32 and keeps the scores (at most ~1e27) finite, so the
    # ranking, and every metric, is the one of the unscaled data
    x, y = _data()
    xi = np.round(x * 2).astype(np.float32)  # exact ties too
    for data in (x, xi):
        scaled = data * np.float32(2.0**40)
        assert retrieval_metrics(scaled, y, metric=metric) == retrieval_metrics(data, y,
                                                                                metric=metric)
        calc = AccuracyCalculator(include=KNN_METRICS, metric=metric)
        assert calc.get_accuracy(scaled, y) == calc.get_accuracy(data, y)
        # scores scale by 2**80: so does the temperature, and every vote weight is unchanged
        assert knn_classifier(scaled, y, scaled[:7], y[:7], k=5, metric=metric,
                              temperature=0.5 * 2.0**80) \
            == knn_classifier(data, y, data[:7], y[:7], k=5, metric=metric, temperature=0.5)


# --------------------------------------------------------------------------------------------
# which search ran


@pytest.mark.parametrize("backend, name", [("faiss", "faiss-cpu IndexFlat exact"),
                                           ("torch", "torch exact (cpu)")])
def test_knn_classifier_and_accuracy_calculator_name_their_search(backend, name):
    x, y = _data()
    kc = knn_classifier(x, y, x[:5], y[:5], k=3, backend=backend, device="cpu")
    assert kc == {"top1": kc["top1"], "top5": kc["top5"]}  # still a plain dict of numbers
    assert kc.backend == name
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision"), k="max_bin_count",
                              backend=backend, device="cpu")
    res = calc.get_accuracy(x, y)
    assert list(res) == ["precision_at_1", "r_precision"]
    assert res.backend == name
    # MAP over the whole ranking: every score row by torch on the device, whatever the backend
    res = AccuracyCalculator(include=("mean_average_precision",), backend=backend,
                             device="cpu").get_accuracy(x, y)
    assert res.backend == "torch exact (cpu), full ranking"
    # clustering only: no search
    res = AccuracyCalculator(include=("NMI",)).get_accuracy(x, y)
    assert res.backend == "none"


# --------------------------------------------------------------------------------------------
# approximate search options


def test_hnsw_ef_search_below_the_window_is_an_error():
    # FAISS's HNSW keeps ef_search candidates, so it returns fewer than the W asked for (index
    # -1) and misses true neighbours: measured 37 of 2,000 ids missing and recall 0.77 at
    # ef_search=1, W=40 (0.998 at ef_search=40)
    x, y = _data(n=60)
    with pytest.raises(ValueError, match=r"ef_search=5 .* 11 neighbours"):
        knn(x, None, 10, exclude_self=True, index="hnsw", index_options={"ef_search": 5})
    with pytest.raises(ValueError, match="ef_search"):
        retrieval_metrics(x, y, index="hnsw", index_options={"ef_search": 3})
    # at the window it runs, and names the setting that ran
    _, _, name = knn(x, None, 10, exclude_self=True, index="hnsw",
                     index_options={"ef_search": 11}, return_backend=True)
    assert name == "faiss-cpu HNSW-Flat(M=32, efConstruction=80, efSearch=11) approximate"
