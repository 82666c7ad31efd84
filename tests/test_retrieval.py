"""evaluation.retrieval: equality with pytorch-metric-learning's AccuracyCalculator and with a
per-query numpy brute force (Recall@K, Precision@1, R-Precision, MAP@R), lone queries, errors."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from evaluation.retrieval import retrieval_metrics

retrieval_mod = importlib.import_module("evaluation.retrieval")
knn_mod = importlib.import_module("evaluation.search")

logging.getLogger("PML").setLevel(logging.ERROR)
# "blocks": backend="auto" with the large-k block path (matrix product + evaluation._topk)
# forced on for every k, so that it runs on these small sets
BACKENDS = ["faiss", "torch", "blocks"]


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "blocks":
        monkeypatch.setattr(knn_mod, "BLOCK_SELECT_MIN_K", 1)
        return "auto"
    return request.param
PML_KEYS = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "map_at_r": "mean_average_precision_at_r",
}


def clustered(sizes, d=8, spread=1.0, seed=0):
    """Gaussian blobs, one per class, ``sizes[c]`` points of class ``c``, in shuffled order."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    y = y[rng.permutation(len(y))]
    centers = rng.standard_normal((len(sizes), d)) * 2.0
    x = centers[y] + spread * rng.standard_normal((len(y), d))
    return x.astype(np.float32), y


def pml(query, yq, reference=None, yr=None):
    calc = AccuracyCalculator(
        include=tuple(PML_KEYS.values()), k="max_bin_count", device=torch.device("cpu")
    )
    if reference is None:
        return calc.get_accuracy(query, yq)
    return calc.get_accuracy(query, yq, reference, yr)


def assert_matches_pml(ours, theirs):
    for mine, name in PML_KEYS.items():
        assert ours[mine] == pytest.approx(theirs[name], abs=1e-6), mine
    assert ours["recall_at_1"] == pytest.approx(ours["precision_at_1"], abs=1e-12)


def brute_force(q, yq, r, yr, ks, metric, same_set):
    """Per-query loop over a full float64 score matrix ordered by (score, index)."""
    q64, r64 = q.astype(np.float64), r.astype(np.float64)
    if metric == "cosine":
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
        r64 /= np.linalg.norm(r64, axis=1, keepdims=True)
    # elementwise, not a matrix product: BLAS may round identical rows differently
    key = -((q64[:, None] - r64[None]) ** 2).sum(-1) if metric == "l2" else (
        (q64[:, None] * r64[None]).sum(-1))
    cols = np.arange(r.shape[0])
    sums = {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0}
    sums.update({f"recall_at_{k}": 0.0 for k in ks})
    n_lone = 0
    for i in range(len(q)):
        keep = cols != i if same_set else np.ones_like(cols, dtype=bool)
        order = cols[keep][np.lexsort((cols[keep], -key[i, keep]))]
        rel = yr[order] == yq[i]
        big_r = int(rel.sum())
        if big_r == 0:
            n_lone += 1
            continue
        sums["precision_at_1"] += rel[0]
        sums["r_precision"] += rel[:big_r].mean()
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        sums["map_at_r"] += (prec[:big_r] * rel[:big_r]).sum() / big_r
        for k in ks:
            sums[f"recall_at_{k}"] += rel[:k].any()
    n = len(q) - n_lone
    out = {name: value / n for name, value in sums.items()}
    out.update(num_queries=len(q), num_lone_queries=n_lone)
    return out


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_same_set_unequal_classes_lone_queries_vs_pml(backend):
    sizes = [1, 2, 3, 5, 8, 40, 13, 1, 25, 60]  # two singleton classes: lone queries
    x, y = clustered(sizes, spread=1.2, seed=1)
    ours = retrieval_metrics(x, y, metric="l2", backend=backend)  # PML ranks by L2
    assert_matches_pml(ours, pml(x, y))
    assert ours["num_queries"] == len(y) and ours["num_lone_queries"] == 2


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_separate_sets_vs_pml(backend):
    xq, yq = clustered([10, 30, 7, 22, 15, 4], spread=1.5, seed=2)
    xr, yr = clustered([25, 3, 40, 9, 12, 1], spread=1.5, seed=2)
    # classes 6 and 7 are only in the queries: lone; class 5 has a single reference item
    yq = np.where(np.arange(len(yq)) % 17 == 0, 6 + np.arange(len(yq)) % 2, yq)
    ours = retrieval_metrics(xq, yq, xr, yr, metric="l2", backend=backend)
    assert_matches_pml(ours, pml(xq, yq, xr, yr))
    assert ours["num_lone_queries"] == int(np.isin(yq, [6, 7]).sum()) > 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_duplicate_vectors_vs_pml(backend):
    x, y = clustered([20, 35, 12, 30], spread=2.0, seed=3)
    order = np.argsort(y, kind="stable")
    # duplicates inside a class (their order then cannot change the metrics)
    for a, b in [(0, 1), (0, 2), (40, 41), (70, 90)]:
        x[order[b]] = x[order[a]]
    ours = retrieval_metrics(x, y, metric="l2", backend=backend)
    assert_matches_pml(ours, pml(x, y))
    xr = np.concatenate([x, x[:10]])  # reference holding copies of queries
    yr = np.concatenate([y, y[:10]])
    ours = retrieval_metrics(x, y, xr, yr, metric="l2", backend=backend)
    assert_matches_pml(ours, pml(x, y, xr, yr))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_cosine_on_normalised_data_vs_pml(backend):
    x, y = clustered([30, 30, 10, 50, 5], d=16, spread=2.5, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # L2 ranking == cosine ranking
    assert_matches_pml(retrieval_metrics(x, y, backend=backend), pml(x, y))
    xr, yr = clustered([12, 40, 10, 20, 9], d=16, spread=2.5, seed=5)
    xr /= np.linalg.norm(xr, axis=1, keepdims=True)
    assert_matches_pml(retrieval_metrics(x, y, xr, yr, backend=backend), pml(x, y, xr, yr))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("same_set", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_all_metrics_vs_brute_force_float(backend, same_set, metric):
    x, y = clustered([15, 25, 9, 40, 1, 10], spread=1.8, seed=6)
    ks = (1, 3, 5, 16)
    if same_set:
        ours = retrieval_metrics(x, y, ks=ks, metric=metric, backend=backend)
        ref = brute_force(x, y, x, y, ks, metric, True)
    else:
        xr, yr = clustered([30, 5, 12, 20, 7, 3], spread=1.8, seed=7)
        ours = retrieval_metrics(x, y, xr, yr, ks=ks, metric=metric, backend=backend)
        ref = brute_force(x, y, xr, yr, ks, metric, False)
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_ties_across_labels_vs_brute_force(backend, metric):
    """Integer vectors: many exact ties, duplicates with different labels; ties go by index."""
    rng = np.random.default_rng(8)
    x = rng.integers(-1, 2, size=(150, 3)).astype(np.float32)  # 27 distinct vectors
    y = rng.integers(0, 6, size=150)
    ks = (1, 2, 4, 8, 30)
    ours = retrieval_metrics(x, y, ks=ks, metric=metric, backend=backend)
    ref = brute_force(x, y, x, y, ks, metric, True)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_collapsed_embeddings_vs_brute_force(backend, metric):
    """Pathological ties: 1,000 identical rows in three classes, plus 150 distinct rows and two
    groups of 20 identical rows that tie with each other (not identical: ones + e_0 and
    ones + e_1) as neighbours of the 1,000. Every tie is ranked by index; the search expands
    the identical rows in order rather than sorting thousands of equal scores."""
    rng = np.random.default_rng(15)
    x = np.ones((1190, 8), dtype=np.float32)
    x[1000:1150] = rng.standard_normal((150, 8))
    x[1150:1170, 0] = x[1170:, 1] = 2.0
    x = x[rng.permutation(len(x))]
    y = rng.integers(0, 3, len(x))
    ks = (1, 2, 8, 1100)  # Recall@1100 reaches past the 1,000 into the tied groups
    ours = retrieval_metrics(x, y, ks=ks, metric=metric, backend=backend)
    ref = brute_force(x, y, x, y, ks, metric, True)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    xr, yr, ks = x[::2], y[::2], (1, 2, 8, 300)
    ours = retrieval_metrics(x[:300], y[:300], xr, yr, ks=ks, metric=metric, backend=backend)
    ref = brute_force(x[:300], y[:300], xr, yr, ks, metric, False)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_backends_and_block_sizes_agree():
    x, y = clustered([50, 80, 30, 40], d=12, spread=2.0, seed=9)
    base = retrieval_metrics(x, y, backend="faiss")
    for other in [
        retrieval_metrics(x, y, backend="torch"),
        retrieval_metrics(x, y, backend="torch", block_size=13),  # other summation order
        retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), backend="faiss"),
    ]:
        assert other == pytest.approx(base, abs=1e-12)
    with pytest.MonkeyPatch.context() as mp:  # the large-k block path, any block size
        mp.setattr(knn_mod, "BLOCK_SELECT_MIN_K", 1)
        for block_size in (None, 13):
            other = retrieval_metrics(x, y, block_size=block_size)
            assert other == pytest.approx(base, abs=1e-12)


def test_searches_only_what_the_metrics_need(monkeypatch):
    seen = []
    real = retrieval_mod.search_blocks

    def spy(query, reference, k, *args, **kwargs):
        seen.append((query.shape[0], reference.shape[0], k))
        return real(query, reference, k, *args, **kwargs)

    monkeypatch.setattr(retrieval_mod, "search_blocks", spy)
    x, y = clustered([1, 20, 35, 7], seed=10)
    retrieval_metrics(x, y, ks=(1, 4))
    assert seen[-1] == (62, 63, 34)  # largest class minus the query; the lone query skipped
    retrieval_metrics(x, y, ks=(1, 50))
    assert seen[-1][2] == 50
    xr, yr = clustered([3, 10, 12, 2], seed=11)
    retrieval_metrics(x, y, xr, yr, ks=(2,))
    assert seen[-1] == (63, 27, 12)


def test_all_queries_lone_gives_nan():
    x, y = clustered([5, 5], seed=12)
    out = retrieval_metrics(x, y, x[:4], np.full(4, 9), ks=(1, 2))
    assert np.isnan(out["precision_at_1"]) and np.isnan(out["recall_at_2"])
    assert out["num_queries"] == 10 and out["num_lone_queries"] == 10
    out = retrieval_metrics(x[:3], np.arange(3), ks=(1,))
    assert np.isnan(out["map_at_r"]) and out["num_lone_queries"] == 3


def test_float_labels_with_integer_values_are_fine():
    x, y = clustered([10, 12, 9], seed=13)
    assert retrieval_metrics(x, y.astype(np.float64)) == retrieval_metrics(x, y)


def test_bad_input():
    x, y = clustered([10, 12, 9], seed=14)
    with pytest.raises(ValueError, match="query_labels has 30 entries but its embeddings have 31"):
        retrieval_metrics(x, y[:-1])
    with pytest.raises(ValueError, match="reference_labels has"):
        retrieval_metrics(x, y, x, y[:5])
    with pytest.raises(ValueError, match="query_labels must hold integer class ids"):
        retrieval_metrics(x, y + 0.5)
    with pytest.raises(ValueError, match="pass reference and reference_labels together"):
        retrieval_metrics(x, y, reference=x)
    with pytest.raises(ValueError, match="only 30 candidate neighbours"):
        retrieval_metrics(x, y, ks=(1, 31))
    with pytest.raises(ValueError, match="ks entry must be a positive integer"):
        retrieval_metrics(x, y, ks=(0, 1))
    with pytest.raises(ValueError, match="ks is empty"):
        retrieval_metrics(x, y, ks=())
    bad = x.copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match="query has NaN"):
        retrieval_metrics(bad, y)
    with pytest.raises(ValueError, match="query must be 2-D"):
        retrieval_metrics(x[:, 0], y)
    with pytest.raises(ValueError, match="query is empty"):
        retrieval_metrics(x[:0], y[:0])
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="at least 2 rows"):
        retrieval_metrics(x[:1], y[:1])
    with pytest.raises(ValueError, match="metric"):
        retrieval_metrics(x, y, metric="dot")
