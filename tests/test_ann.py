"""Approximate k-NN (evaluation.ann): recall floors, agreement with exact search, validation.

Structured synthetic set: 4,000 x 32, 40 classes, noise 2 in 8 intrinsic dimensions
(evaluation.ann.structured_embeddings; exact MAP@R 0.235, P@1 0.993). The stated floors on it,
with each index's defaults: recall of the true 10 nearest neighbours >= 0.95 for IVF-Flat
(measured 0.981), >= 0.98 for HNSW (1.000), >= 0.80 for IVF-PQ with exact re-ranking (0.859:
4-byte codes at d = 32); |delta| of P@1 / R-Precision / MAP@R against exact search <= 0.02
(measured <= 0.0096).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from evaluation import knn, retrieval_metrics  # noqa: E402
from evaluation.ann import (  # noqa: E402
    ANN_MIN_N,
    default_params,
    resolve_index,
    structured_embeddings,
)

N, C, D = 4000, 40, 32
FLOORS = {"ivf": 0.95, "ivfpq": 0.80, "hnsw": 0.98}


@pytest.fixture(scope="module")
def data():
    return structured_embeddings(N, C, D, noise=2.0, intrinsic_dim=8, seed=0)


@pytest.fixture(scope="module")
def exact10(data):
    x, _ = data
    return knn(x, None, 10, exclude_self=True, index="exact")


def assert_same_neighbours(s_a, i_a, s_e, i_e):
    """Equal up to the order of near-ties: the scores at every rank agree, and the rare index
    differences are swaps of scores within float32 rounding of each other (the two backends
    round differently, see evaluation.search)."""
    np.testing.assert_allclose(s_a, s_e, rtol=1e-5, atol=2e-5)
    assert (i_a != i_e).mean() < 1e-3


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(a, b).size for a, b in zip(approx, exact)])
                 / exact.shape[1])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_recall_of_true_neighbours_above_floor(data, exact10, kind):
    x, _ = data
    s, i, backend = knn(x, None, 10, exclude_self=True, index=kind, return_backend=True)
    assert backend.startswith("faiss-cpu ") and backend.endswith("approximate")
    assert recall(i, exact10[1]) >= FLOORS[kind]
    assert not (i == np.arange(N)[:, None]).any()  # own row excluded
    assert (np.diff(s, axis=1) <= 0).all()  # nearest first
    # the returned scores are the exact cosines of the returned rows (IVF-PQ re-ranks exactly)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(s, np.einsum("nd,nkd->nk", xn, xn[i]), atol=2e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_metric_differences_small(data, kind):
    x, y = data
    ex = retrieval_metrics(x, y, index="exact")
    ap = retrieval_metrics(x, y, index=kind)
    for m in ("precision_at_1", "r_precision", "map_at_r"):
        assert abs(ap[m] - ex[m]) <= 0.02, (m, ap[m], ex[m])
    assert ex["map_at_r"] > 0.1  # the set is neither trivial ...
    assert ex["map_at_r"] < 0.99  # ... nor hopeless
    assert ap.backend.startswith(f"faiss-cpu {'IVF-Flat' if kind == 'ivf' else 'HNSW'}")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_probing_every_cell_equals_exact(data, metric):
    x, y = data
    q = x[:300] * 3.0  # not unit-norm: l2 differs from cosine
    opts = {"nlist": 50, "nprobe": 50}
    s_e, i_e = knn(q, x, 25, metric=metric, index="exact")
    s_a, i_a = knn(q, x, 25, metric=metric, index="ivf", index_options=opts)
    assert_same_neighbours(s_a, i_a, s_e, i_e)
    a = retrieval_metrics(x, y, index="ivf", index_options=opts, metric=metric)
    e = retrieval_metrics(x, y, index="exact", metric=metric)
    assert a.keys() == e.keys()
    for key in e:  # float64 sums over other block sizes (and float32 near-ties) differ ~1e-8
        assert a[key] == pytest.approx(e[key], abs=1e-6)


def test_rows_short_of_neighbours_fall_back_to_exact(data):
    """nprobe=1 over ~40-row cells cannot hold 400 neighbours: the rows are searched exactly."""
    x, _ = data
    s_e, i_e = knn(x[:200], x, 400, index="exact")
    s_a, i_a = knn(x[:200], x, 400, index="ivf", index_options={"nlist": 100, "nprobe": 1})
    assert_same_neighbours(s_a, i_a, s_e, i_e)


def test_ivfpq_without_refine_returns_pq_estimates(data, exact10):
    x, _ = data
    s, i = knn(x, None, 10, exclude_self=True, index="ivfpq", index_options={"refine": 0})
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    err = np.abs(s - np.einsum("nd,nkd->nk", xn, xn[i]))
    assert err.max() > 1e-3  # estimates, not exact scores
    assert recall(i, exact10[1]) >= 0.5


def test_exact_path_unchanged(data):
    x, y = data
    torch_s, torch_i = knn(x, None, 12, exclude_self=True, backend="torch", index="exact")
    s, i, backend = knn(x, None, 12, exclude_self=True, return_backend=True)  # auto: exact here
    np.testing.assert_array_equal(i, torch_i)
    np.testing.assert_allclose(s, torch_s, atol=1e-5)
    assert backend == "faiss-cpu IndexFlat exact"
    a = retrieval_metrics(x, y)
    e = retrieval_metrics(x, y, index="exact", backend="torch", device="cpu")
    assert dict(a) == dict(e)
    assert e.backend == "torch exact (cpu)"
    assert a.backend in (
        "faiss-cpu IndexFlat exact", "torch-cpu blocks exact (matmul + top-k scan)"
    )
    assert all(isinstance(v, (int, float)) for v in a.values())  # callers format every value
    lone = retrieval_metrics(x[:3], np.arange(3), ks=(1,))
    assert lone.backend == "none" and lone["num_lone_queries"] == 3


def test_auto_picks_by_size_and_device():
    assert resolve_index("auto", ANN_MIN_N - 1, 128, 100, device="cpu") is None
    p = resolve_index("auto", ANN_MIN_N, 128, 100, device="cpu")
    assert p is not None and p.kind == "ivf"
    assert resolve_index("auto", ANN_MIN_N, 128, 100, backend="torch", device="cpu") is None
    if torch.cuda.is_available():
        assert resolve_index("auto", ANN_MIN_N, 128, 100, device="cuda") is None
    # documented defaults: nlist = 4 sqrt(N), nprobe = max(32, ceil(4 W nlist / N))
    p = default_params("ivf", 1_000_000, 128, 1100)
    assert (p.nlist, p.nprobe, p.train_size) == (4000, 32, 256_000)
    p = default_params("ivf", 1_000_000, 128, 5000)
    assert p.nprobe == 80
    q = default_params("ivfpq", 1_000_000, 128, 1100)
    assert (q.pq_m, q.pq_bits, q.refine) == (16, 8, 4)
    assert default_params("hnsw", 10_000, 64, 100).ef_search == 200
    assert default_params("ivf", 1000, 8, 10).nlist == 1000 // 39


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"index": "flat"}, ValueError, "index must be one of"),
        ({"index": "ivf", "index_options": {"nprobes": 4}}, ValueError, r"\['nprobes'\].*takes"),
        ({"index": "ivf", "index_options": {"nlist": 10, "nprobe": 20}}, ValueError,
         "nprobe=20 exceeds nlist=10"),
        ({"index": "ivf", "index_options": {"nlist": 0}}, ValueError, "positive integer"),
        ({"index": "ivf", "index_options": {"nprobe": 2.5}}, ValueError, "positive integer"),
        ({"index": "ivf", "index_options": {"nlist": 10_000}}, ValueError, "exceeds the 4000"),
        ({"index": "ivfpq", "index_options": {"pq_m": 5}}, ValueError, "must divide"),
        ({"index": "hnsw", "index_options": {"nprobe": 4}}, ValueError, "do not apply"),
        ({"index": "exact", "index_options": {"nprobe": 4}}, ValueError, "only used by an"),
        ({"index_options": {"nprobe": 4}}, ValueError, "index='auto' chose exact"),
        ({"index": "ivf", "index_options": [("nprobe", 4)]}, ValueError, "must be a dict"),
        ({"index": "ivf", "backend": "torch"}, ValueError, "backend='torch'"),
    ],
)
def test_option_validation(data, kwargs, exc, match):
    x, y = data
    with pytest.raises(exc, match=match):
        knn(x, None, 5, exclude_self=True, **kwargs)
    with pytest.raises(exc, match=match):
        retrieval_metrics(x, y, **kwargs)


def test_structured_embeddings():
    x, y = structured_embeddings(3000, 30, 16, noise=0.5, intrinsic_dim=4, seed=3)
    x2, y2 = structured_embeddings(3000, 30, 16, noise=0.5, intrinsic_dim=4, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.dtype == np.float32 and x.shape == (3000, 16)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert set(np.unique(y)) == set(range(30))
    # known structure: at low noise the nearest neighbour shares the class
    assert retrieval_metrics(x, y, index="exact")["precision_at_1"] > 0.95
    x_hi, y_hi = structured_embeddings(3000, 30, 16, noise=4.0, intrinsic_dim=4, seed=3)
    assert retrieval_metrics(x_hi, y_hi, index="exact")["map_at_r"] < 0.5
    with pytest.raises(ValueError, match="intrinsic_dim"):
        structured_embeddings(10, 2, 4, intrinsic_dim=8)
