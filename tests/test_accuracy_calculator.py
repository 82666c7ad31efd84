"""evaluation.AccuracyCalculator: every metric, option and call shape against
pytorch-metric-learning's AccuracyCalculator (float64 inputs, exact ties, lone queries, per
class and avg-of-avgs) and against a per-query numpy brute force; both neighbour paths (top-k
window and relevant ranks); errors."""

from __future__ import annotations

import importlib
import logging

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PMLCalculator
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

from evaluation import AccuracyCalculator
from evaluation.accuracy_calculator import KNN_METRICS, METRICS

calc_mod = importlib.import_module("evaluation.accuracy_calculator")
search_mod = importlib.import_module("evaluation.search")
logging.getLogger("PML").setLevel(logging.ERROR)
CPU = torch.device("cpu")


def clustered(sizes, d=8, spread=1.0, seed=0):
    """float64 Gaussian blobs, ``sizes[c]`` points of class ``c`` (shuffled), with exact
    duplicates inside classes and singleton classes (lone queries)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    y = y[rng.permutation(len(y))]
    x = rng.standard_normal((len(sizes), d))[y] * 2.0 + spread * rng.standard_normal((len(y), d))
    for c in range(len(sizes)):
        members = np.flatnonzero(y == c)
        if members.size >= 3:
            x[members[1:3]] = x[members[0]]
    return x, y


def ties(n, seed):
    """float64 vectors in {-1, 0, 1}^3 (27 distinct) with random labels: exact ties across
    labels everywhere, broken by reference index."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1, 2, size=(n, 3)).astype(np.float64), rng.integers(0, 6, n)


def assert_same(ours, theirs, tol=1e-6):
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=tol, err_msg=name)


def pml(args, knn_func=None, **kw):
    calc = PMLCalculator(include=KNN_METRICS, device=CPU, knn_func=knn_func, **kw)
    return calc.get_accuracy(*[torch.from_numpy(a) if a is not None else None for a in args[:4]],
                             *args[4:])


OPTIONS = [
    {},
    {"k": "max_bin_count"},
    {"k": 5},
    {"k": 40},
    {"avg_of_avgs": True},
    {"return_per_class": True, "k": "max_bin_count"},
    {"avg_of_avgs": True, "k": 12},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("case", ["same-set", "separate", "ref-includes-query", "ties"])
def test_equals_pml(case, options):
    """float64 inputs, PML's default distance (squared L2 on the raw embeddings)."""
    if case == "same-set":
        x, y = clustered([1, 2, 3, 5, 8, 40, 13, 1, 25, 60], spread=1.2, seed=1)
        args = (x, y)
    elif case == "separate":  # classes 6, 7 only among the queries: lone
        xq, yq = clustered([10, 30, 7, 22, 15, 4], spread=1.5, seed=2)
        xr, yr = clustered([25, 3, 40, 9, 12, 1], spread=1.5, seed=2)
        yq = np.where(np.arange(len(yq)) % 17 == 0, 6 + np.arange(len(yq)) % 2, yq)
        args = (xq, yq, xr, yr, False)
    elif case == "ref-includes-query":  # the queries, then more reference rows
        xq, yq = clustered([12, 30, 7, 1, 15], spread=1.5, seed=3)
        xe, ye = clustered([20, 3, 10, 2, 9], spread=1.5, seed=4)
        args = (xq, yq, np.concatenate([xq, xe]), np.concatenate([yq, ye]), True)
    else:
        args = ties(300, seed=5)
    ours = AccuracyCalculator(include=KNN_METRICS, device="cpu", **options).get_accuracy(*args)
    assert_same(ours, pml(args, **options))
    if options.get("return_per_class"):
        assert isinstance(ours["r_precision"], list) and len(ours["r_precision"]) > 3


def test_default_metrics_and_clustering_equal_pml():
    """All seven metrics by default (NMI/AMI from the same FAISS k-means as PML's default)."""
    x, y = clustered([20, 35, 12, 30, 3], d=6, spread=2.0, seed=6)
    ours = AccuracyCalculator(device="cpu").get_accuracy(x, y)
    theirs = PMLCalculator(device=CPU).get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    assert list(ours) == list(METRICS) == list(theirs)
    assert_same(ours, theirs)
    x32 = torch.from_numpy(x).float()  # float32 tensors in: the same values
    assert_same(AccuracyCalculator(device="cpu").get_accuracy(x32, torch.from_numpy(y)), theirs)
    # a user's k-means function is used by both
    def kmeans(emb, n):
        return torch.as_tensor(np.arange(len(emb)) % n)

    assert_same(
        AccuracyCalculator(include=("NMI", "AMI"), kmeans_func=kmeans).get_accuracy(x, y),
        PMLCalculator(include=("NMI", "AMI"), kmeans_func=kmeans, device=CPU).get_accuracy(
            torch.from_numpy(x), torch.from_numpy(y)),
        tol=1e-12,
    )


def test_inner_product_and_cosine_equal_pml():
    x, y = clustered([20, 35, 12, 30, 3], d=6, spread=2.0, seed=7)
    args = (x[:60], y[:60], x, y, True)
    ip = FaissKNN(index_init_fn=faiss.IndexFlatIP)
    ours = AccuracyCalculator(include=KNN_METRICS, metric="ip").get_accuracy(*args)
    assert_same(ours, pml(args, knn_func=ip))
    # PML's cosine search is torch.topk (no tie rule): distinct rows only
    xd, yd = np.unique(x, axis=0), y[np.unique(x, axis=0, return_index=True)[1]]
    ours = AccuracyCalculator(include=KNN_METRICS, metric="cosine", k="max_bin_count")
    theirs = pml((xd, yd), knn_func=CustomKNN(CosineSimilarity()), k="max_bin_count")
    assert_same(ours.get_accuracy(xd, yd), theirs)


def brute_force(q, yq, r, yr, includes_query, depth, metric="l2"):
    """Per-query loop over float64 keys ordered by (key desc, index asc); PML's formulas."""
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
    # elementwise, not a matrix product: BLAS may round identical rows differently
    pair = (q[:, None] - r[None]) ** 2 if metric == "l2" else -(q[:, None] * r[None])
    key = -pair.sum(-1)
    cols = np.arange(len(r))
    vals = {n: [] for n in KNN_METRICS}
    for i in range(len(q)):
        keep = cols != i if includes_query else np.ones(len(r), dtype=bool)
        order = cols[keep][np.lexsort((cols[keep], -key[i, keep]))]
        rel = yr[order] == yq[i]
        big_r = int(rel.sum())
        if big_r == 0:
            continue
        k = len(order) if depth is None else depth
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        m = min(big_r, k)
        vals["precision_at_1"].append(rel[0])
        vals["r_precision"].append(rel[:m].mean())
        vals["mean_average_precision_at_r"].append((prec * rel)[:m].sum() / big_r)
        vals["mean_average_precision"].append((prec * rel)[:k].sum() / big_r)
        first = np.flatnonzero(rel[:k])
        vals["mean_reciprocal_rank"].append(1.0 / (first[0] + 1) if first.size else 0.0)
    return {n: float(np.mean(v)) for n, v in vals.items()}


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k", [None, 3, 30, "max_bin_count"])
def test_equals_brute_force(metric, k):
    """k=None takes the relevant-ranks path, an int or "max_bin_count" the top-k window.
    Exact ties across labels for l2 and ip (integer vectors); Gaussian data for cosine (whose
    normalised integer vectors hold float32 near-ties, the documented caveat of the search)."""
    if metric == "cosine":
        (xq, yq), (xe, ye) = clustered([20, 50, 9, 1, 40, 30], seed=8), clustered([9, 30], seed=9)
    else:
        (xq, yq), (xe, ye) = ties(150, seed=8), ties(60, seed=9)
    xr, yr = np.concatenate([xq, xe]), np.concatenate([yq, ye])
    for args, includes in [((xq, yq), True), ((xq, yq, xr, yr, True), True),
                           ((xq[:50], yq[:50], xr[50:], yr[50:], False), False)]:
        q, y_q = args[0], args[1]
        r, y_r = (args[2], args[3]) if len(args) > 2 else (q, y_q)
        depth = None if k is None else (
            k if isinstance(k, int) else int(np.bincount(y_r)[np.unique(y_q)].max()) - includes
        )
        ours = AccuracyCalculator(include=KNN_METRICS, k=k, metric=metric).get_accuracy(*args)
        ref = brute_force(q, y_q, r, y_r, includes, depth, metric)
        for name, value in ref.items():
            assert ours[name] == pytest.approx(value, abs=1e-12), (name, args[-1])


def test_both_neighbour_paths_agree(monkeypatch):
    """MAP and MRR over the whole ranking: relevant ranks (the default for k=None) == a top-k
    window as wide as the reference set."""
    x, y = clustered([30, 45, 12, 60, 1, 9], d=5, spread=2.5, seed=10)
    calc = AccuracyCalculator(include=KNN_METRICS)
    seen = []
    real = calc_mod.AccuracyCalculator._rank_search
    monkeypatch.setattr(calc_mod.AccuracyCalculator, "_rank_search",
                        lambda *a: seen.append(1) or real(*a))
    by_ranks = calc.get_accuracy(x, y)
    assert seen == [1]
    monkeypatch.setattr(calc_mod, "_use_ranks", lambda *a: False)
    by_window = calc.get_accuracy(x, y)
    assert seen == [1]
    assert by_ranks == pytest.approx(by_window, abs=1e-12)


def test_collapsed_embeddings():
    """2,000 identical rows in three classes: the ranking is the index order (self left out)."""
    n = 2000
    y = np.random.default_rng(11).integers(0, 3, n)
    x = np.ones((n, 16))
    calc = AccuracyCalculator(include=KNN_METRICS, k="max_bin_count")
    ours = calc.get_accuracy(x, y)
    ref = brute_force(x[:300], y[:300], x, y, True, int(np.bincount(y).max()) - 1)
    sub = calc.get_accuracy(x[:300], y[:300], x, y, True)
    for name, value in ref.items():
        assert sub[name] == pytest.approx(value, abs=1e-12), name
    # every query ranks the others by index: P@1 = [the next (or previous) index shares the label]
    nxt = np.where(np.arange(n) == 0, y[1], y[0])
    assert ours["precision_at_1"] == pytest.approx(np.mean(nxt == y), abs=1e-12)
    assert_same(ours, pml((x, y), k="max_bin_count"))


def test_lone_queries_and_all_lone():
    x, y = clustered([5, 5], seed=12)
    calc = AccuracyCalculator(include=KNN_METRICS, return_per_class=True)
    out = calc.get_accuracy(x, y, x[:4], np.full(4, 9))
    theirs = pml((x, y, x[:4], np.full(4, 9), False), return_per_class=True)
    assert list(out) == list(theirs)
    assert all(len(v) == 2 and np.isnan(v).all() for v in out.values())
    out = AccuracyCalculator(include=("precision_at_1",)).get_accuracy(x[:3], np.arange(3))
    assert np.isnan(out["precision_at_1"])


def test_include_exclude_and_call_shapes():
    x, y = clustered([10, 12, 9], seed=13)
    calc = AccuracyCalculator(exclude=("NMI", "AMI", "mean_reciprocal_rank"))
    assert calc.get_curr_metrics() == [
        "mean_average_precision", "mean_average_precision_at_r", "precision_at_1", "r_precision"
    ]
    full = calc.get_accuracy(x, y)
    assert list(calc.get_accuracy(x, y, include=("r_precision",))) == ["r_precision"]
    assert list(calc.get_accuracy(x, y, exclude=("r_precision",))) == [
        "mean_average_precision", "mean_average_precision_at_r", "precision_at_1"
    ]
    # PML's positional call with ref_includes_query, torch tensors in, plain floats out
    pos = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y), x, y, True)
    assert pos == full and all(type(v) is float for v in pos.values())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"include": ("recall_at_1",)}, ValueError, "unsupported metric"),
        ({"exclude": "NMI"}, TypeError, "exclude must be a tuple or list"),
        ({"avg_of_avgs": True, "return_per_class": True}, ValueError, "mutually exclusive"),
        ({"k": 0}, ValueError, "k must be None, 'max_bin_count' or a positive integer"),
        ({"k": "all"}, ValueError, "k must be None"),
        ({"k": True}, ValueError, "k must be None"),
        ({"label_comparison_fn": lambda a, b: a == b}, NotImplementedError, "integer class"),
        ({"knn_func": object()}, NotImplementedError, "metric='l2'"),
        ({"metric": "hamming"}, ValueError, "metric must be one of"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        AccuracyCalculator(**kwargs)


def test_bad_calls():
    x, y = clustered([10, 12, 9], seed=14)
    calc = AccuracyCalculator(include=("precision_at_1",))
    with pytest.raises(ValueError, match="first len\\(query\\) rows of reference"):
        calc.get_accuracy(x, y, x[::-1], y[::-1], True)
    with pytest.raises(ValueError, match="reference was passed without reference_labels"):
        calc.get_accuracy(x, y, x)
    with pytest.raises(ValueError, match="k=40 but each query has only 30"):
        AccuracyCalculator(include=("precision_at_1",), k=40).get_accuracy(x, y)
    with pytest.raises(ValueError, match="query_labels has 30 entries"):
        calc.get_accuracy(x, y[:-1])
    with pytest.raises(ValueError, match="include holds unsupported"):
        calc.get_accuracy(x, y, include=("MAP",))
    with pytest.raises(ValueError, match="query has NaN"):
        calc.get_accuracy(np.where(x > 3, np.nan, x), y)
