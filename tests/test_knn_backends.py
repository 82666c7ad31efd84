"""evaluation.backends / ties / pml_interop: the k-NN backend protocol, the tie wrapper over any
backend, pytorch-metric-learning interop both ways, and thread settings left as the caller had
them."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from evaluation import knn, retrieval_metrics
from evaluation.backends import BlockScanBackend, FaissBackend, KnnBackend, TorchBackend
from evaluation.pml_interop import KnnFunc, PmlBackend
from evaluation.ties import ExactTies

threadpoolctl = pytest.importorskip("threadpoolctl")
faiss = pytest.importorskip("faiss")
pml_inference = pytest.importorskip("pytorch_metric_learning.utils.inference")
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # noqa: E402

search_mod = importlib.import_module("evaluation.search")

PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r",
               "mean_average_precision", "mean_reciprocal_rank")


def gaussian(n, d, seed):
    """Continuous data: no ties (with probability 1)."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def clustered(n, classes, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d)).astype(np.float32)[y]
    x += 1.2 * rng.standard_normal((n, d)).astype(np.float32)
    return x, y


def brute(q, r, k, metric):
    """float64 reference: (scores in the protocol's convention, indices)."""
    q64, r64 = q.astype(np.float64), r.astype(np.float64)
    if metric == "l2":
        s = ((q64[:, None] - r64[None]) ** 2).sum(-1)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    else:
        s = q64 @ r64.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def backends(metric):
    return [FaissBackend(metric), TorchBackend(metric), BlockScanBackend(metric)]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_each_backend_is_a_protocol_search_equal_to_brute_force(metric):
    q, r = gaussian(70, 8, 1), gaussian(300, 8, 2)
    k = 20
    bf_s, bf_i = brute(q, r, k, metric)
    for b in backends(metric):
        assert isinstance(b, KnnBackend)
        s, i = b.search(torch.from_numpy(q), torch.from_numpy(r), k)
        assert s.dtype == torch.float32 and i.dtype == torch.int64
        np.testing.assert_array_equal(i.numpy(), bf_i, err_msg=type(b).__name__)
        np.testing.assert_allclose(s.numpy(), bf_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_ties_over_any_backend_equals_knn(metric):
    """Integer data (ties and duplicate rows everywhere): the wrapper makes every backend,
    also a wrapped PML knn_func, return knn()'s exact (score, index) order."""
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(150, 3)).astype(np.float32)
    k = 25
    s_ref, i_ref = knn(x, None, k, metric, exclude_self=True, backend="torch")
    self_index = torch.arange(150)
    pml = PmlBackend(pml_inference.FaissKNN(), "l2") if metric == "l2" else \
        PmlBackend(pml_inference.FaissKNN(index_init_fn=faiss.IndexFlatIP), "ip")
    for b in [*backends(metric), pml]:
        s, i = ExactTies(b).search(torch.from_numpy(x), torch.from_numpy(x), k, self_index)
        np.testing.assert_array_equal(i.numpy(), i_ref, err_msg=type(b).__name__)
        np.testing.assert_allclose(s.numpy(), s_ref, atol=1e-5)


@pytest.mark.parametrize("same_set", [True, False])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_our_search_inside_pml_accuracy_calculator_gives_pml_numbers(metric, same_set):
    x, y = clustered(600, 12, seed=4)
    xq, yq = torch.from_numpy(x[:250]), torch.from_numpy(y[:250])
    xr, yr = torch.from_numpy(x[250:]), torch.from_numpy(y[250:])
    pml_knn = pml_inference.FaissKNN() if metric == "l2" else \
        pml_inference.CustomKNN(CosineSimilarity())
    theirs = AccuracyCalculator(include=PML_METRICS, knn_func=pml_knn)
    ours = AccuracyCalculator(include=PML_METRICS, knn_func=KnnFunc(metric))
    if same_set:
        a, b = theirs.get_accuracy(xq, yq), ours.get_accuracy(xq, yq)
    else:
        a, b = theirs.get_accuracy(xq, yq, xr, yr), ours.get_accuracy(xq, yq, xr, yr)
    assert a.keys() == b.keys()
    for name in a:
        assert b[name] == pytest.approx(a[name], abs=1e-6), name


def test_knn_func_returns_pml_distances_and_indices():
    x = torch.from_numpy(gaussian(120, 6, 5))
    d_ref, i_ref = pml_inference.FaissKNN()(x, 10, x, True)
    d, i = KnnFunc("l2")(x, 10, x, True)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=1e-4)


def test_pml_knn_func_inside_our_knn_and_retrieval_metrics_gives_ours():
    x, y = clustered(500, 10, seed=6)
    for metric, pml in [("l2", PmlBackend(pml_inference.FaissKNN(), "l2")),
                        ("cosine", PmlBackend(pml_inference.CustomKNN(CosineSimilarity()), "ip"))]:
        s, i = knn(x, None, 15, metric, exclude_self=True, backend=pml)
        s_ref, i_ref = knn(x, None, 15, metric, exclude_self=True)
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)
        got = retrieval_metrics(x, y, metric=metric, backend=pml)
        ref = retrieval_metrics(x, y, metric=metric)
        assert got.keys() == ref.keys()
        for name in ref:
            assert got[name] == pytest.approx(ref[name], abs=1e-12), name
        assert "custom backend" in got.backend
    with pytest.raises(ValueError, match="metric"):
        knn(x, None, 5, "l2", backend=PmlBackend(pml_inference.FaissKNN(), "ip"))


# --------------------------------------------------------------------------------------------
# no side effects visible to the caller


def _settings():
    info = threadpoolctl.threadpool_info()
    return (torch.get_num_threads(),
            sorted((m["user_api"], m["prefix"], m["num_threads"]) for m in info),
            faiss.cvar.distance_compute_blas_query_bs,
            faiss.cvar.distance_compute_blas_database_bs)


@pytest.mark.parametrize("backend", ["auto", "faiss", "torch"])
def test_caller_code_between_iterations_sees_its_own_thread_settings(monkeypatch, backend):
    """search_blocks yields between batches of work; the caller's code there (and after the
    search) sees torch's thread count, threadpoolctl's limits and FAISS's tile sizes as it set
    them, while the CPU block path runs its workers single-threaded inside."""
    monkeypatch.setattr(search_mod, "_CPU_RESULT_BYTES", 1)  # a batch per `parts` tasks
    x, _ = clustered(3000, 5, seed=7)
    xn = search_mod.normalize_rows(x)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
            before = _settings()
            seen, info = [], {}
            for _rows, _key, _idx in search_mod.search_blocks(
                xn, xn, 300, "ip", np.arange(3000), backend, "cpu", block_size=100,
                large_k_blocks=True, info=info,
            ):
                seen.append(_settings())
            assert len(seen) == 30
            assert all(s == before for s in seen)
            assert _settings() == before
        if backend == "auto":
            assert info["backend"].startswith("torch-cpu blocks")
    finally:
        torch.set_num_threads(old)


def test_workers_run_single_threaded_and_errors_restore(monkeypatch):
    """Inside :func:`run_single_threaded` torch runs on one thread; an error in a task still
    restores the caller's count."""
    from concurrent.futures import ThreadPoolExecutor

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside = []

        def task(i):
            inside.append(torch.get_num_threads())
            if i == 3:
                raise RuntimeError("boom")
            return i

        with ThreadPoolExecutor(2) as pool:
            assert search_mod.run_single_threaded(pool, lambda i: i * i, range(4)) == [0, 1, 4, 9]
            with pytest.raises(RuntimeError, match="boom"):
                search_mod.run_single_threaded(pool, task, range(5))
        assert inside and set(inside) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
