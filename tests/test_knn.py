"""evaluation.search: exact search against numpy brute force, both backends, ties, bad input."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from evaluation._inputs import as_float_matrix, as_labels
from evaluation.search import find_duplicates, knn, resolve_backend

# the package exports a function named `knn`, which shadows the submodule attribute
knn_mod = importlib.import_module("evaluation.search")
backends_mod = importlib.import_module("evaluation.backends")
BACKENDS = ["faiss", "torch", "blocks"]


def brute_force(q, r, k, metric, exclude_self=False):
    """float64 scores, order by (score, index); returns (scores, indices)."""
    q64, r64 = q.astype(np.float64), r.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        r64 = r64 / np.linalg.norm(r64, axis=1, keepdims=True)
    if metric == "l2":
        key = -((q64[:, None, :] - r64[None, :, :]) ** 2).sum(-1)
    else:
        key = q64 @ r64.T
    if exclude_self:
        np.fill_diagonal(key, -np.inf)
    cols = np.broadcast_to(np.arange(key.shape[1]), key.shape)
    order = np.lexsort((cols, -key), axis=1)[:, :k]
    scores = np.take_along_axis(key, order, 1)
    return (-scores if metric == "l2" else scores), order, key


def integer_data(n, d, seed, low=-2, high=3):
    """Small-integer vectors: float32 dot products and distances are exact, ties are frequent."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=(n, d)).astype(np.float32)


def distinct_integer_data(n, d, seed):
    """Distinct small-integer rows (no duplicates), shuffled: exact ties between distinct rows."""
    rng = np.random.default_rng(seed)
    rows = np.unique(rng.integers(-2, 3, size=(4 * n, d)), axis=0)
    return rows[rng.permutation(len(rows))[:n]].astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("duplicates", [True, False])
def test_exact_ties_match_brute_force(backend, metric, exclude_self, duplicates):
    if duplicates:  # 125 distinct vectors at most: many exact duplicate rows
        q = integer_data(120, 3, seed=1)
        r = q if exclude_self else integer_data(90, 3, seed=2)
    else:
        q = distinct_integer_data(120, 4, seed=1)
        r = q if exclude_self else distinct_integer_data(90, 4, seed=2)
        assert find_duplicates(r) is None
    k = 17
    scores, idx = knn(q, None if exclude_self else r, k, metric, exclude_self, backend=backend)
    bf_s, bf_i, _ = brute_force(q, r, k, metric, exclude_self)
    np.testing.assert_array_equal(idx, bf_i)
    np.testing.assert_array_equal(scores, bf_s.astype(np.float32))
    assert scores.dtype == np.float32 and idx.dtype == np.int64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_float_data_matches_brute_force(backend, metric):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((150, 12)).astype(np.float32)
    r = rng.standard_normal((200, 12)).astype(np.float32)
    r[50:60] = r[7]  # duplicated reference rows: exact ties, broken by index
    k = 20
    scores, idx = knn(q, r, k, metric, backend=backend)
    bf_s, bf_i, key = brute_force(q, r, k, metric)
    np.testing.assert_allclose(scores, bf_s, rtol=1e-5, atol=1e-5)
    # where the order differs from float64 brute force, it must be a float32-rounding near-tie
    diff = idx != bf_i
    rows = np.nonzero(diff)[0]
    gap = np.abs(key[rows, idx[diff]] - key[rows, bf_i[diff]])
    assert diff.mean() < 0.01 and (gap < 1e-5 * (1 + np.abs(key[rows, bf_i[diff]]))).all()
    # the duplicated rows come out in index order wherever they appear
    for row in idx:
        dup = row[np.isin(row, [7, *range(50, 60)])]
        assert (np.diff(dup) > 0).all()


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_backends_agree_with_duplicates(metric, exclude_self):
    """Identical vectors tie exactly in every backend and block size, and are ordered by index.

    (Distinct vectors with mathematically equal scores, e.g. permuted integer vectors under
    cosine, are not exact float32 ties; that documented caveat is avoided with Gaussian data.)
    """
    rng = np.random.default_rng(4)
    base = rng.standard_normal((40, 6)).astype(np.float32)
    q = base[rng.integers(0, 40, 200)]  # 200 rows, about 5 copies of each vector
    r = q if exclude_self else base[rng.integers(0, 40, 150)]
    k = 30
    a = knn(q, r, k, metric, exclude_self, backend="faiss")
    b = knn(q, r, k, metric, exclude_self, backend="torch")
    c = knn(q, r, k, metric, exclude_self, backend="torch", block_size=7)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(b[1], c[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_reference_chunking(monkeypatch, device):
    """A tiny block budget on the device searched (set explicitly, so that on a CUDA machine the
    CPU case still runs on the CPU) forces the torch backend to merge top-k over reference
    chunks; a spy on the score blocks checks that chunks narrower than the reference ran."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    budget = "_GPU_BLOCK_BYTES" if device == "cuda" else "_CPU_BLOCK_BYTES"
    monkeypatch.setattr(backends_mod, budget, 64 * 40 * 4)  # 64 query rows x 40 reference rows
    widths = []
    real = backends_mod.block_keys
    monkeypatch.setattr(backends_mod, "block_keys",
                        lambda q, r, *a, **kw: widths.append((r.shape[0], r.device.type))
                        or real(q, r, *a, **kw))
    q = integer_data(70, 3, seed=6)
    n_searched = len(np.unique(q, axis=0))  # duplicate rows are searched once
    assert n_searched > 40
    k = 25
    s, i = knn(q, None, k, "l2", exclude_self=True, backend="torch", device=device)
    assert {dev for _, dev in widths} == {device}
    assert sum(w == 40 for w, _ in widths) >= 2 and min(w for w, _ in widths) < 40
    bf_s, bf_i, _ = brute_force(q, q, k, "l2", exclude_self=True)
    np.testing.assert_array_equal(i, bf_i)
    np.testing.assert_array_equal(s, bf_s.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_collapsed_embeddings_fall_back_to_index_order(backend):
    """All rows identical: every score ties, the window is never enough, rows are recomputed."""
    x = np.ones((60, 5), dtype=np.float32)
    s, i = knn(x, None, 12, "cosine", exclude_self=True, backend=backend)
    expected = np.array([[j for j in range(60) if j != row][:12] for row in range(60)])
    np.testing.assert_array_equal(i, expected)
    np.testing.assert_allclose(s, 1.0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_self_by_index_keeps_duplicates(backend):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    x[5] = x[9]
    s, i = knn(x, None, 3, "l2", exclude_self=True, backend=backend)
    assert (i != np.arange(40)[:, None]).all()
    assert i[5, 0] == 9 and i[9, 0] == 5 and s[5, 0] == 0.0
    # passing the same array as reference explicitly is the same
    s2, i2 = knn(x, x.copy(), 3, "l2", exclude_self=True, backend=backend)
    np.testing.assert_array_equal(i, i2)


def test_k_equal_to_reference_size_returns_everything():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((10, 4)).astype(np.float32)
    r = rng.standard_normal((15, 4)).astype(np.float32)
    for backend in BACKENDS:
        _, i = knn(q, r, 15, "ip", backend=backend)
        _, bf_i, _ = brute_force(q, r, 15, "ip")
        np.testing.assert_array_equal(i, bf_i)
        _, i = knn(q, None, 9, "ip", exclude_self=True, backend=backend)
        _, bf_i, _ = brute_force(q, q, 9, "ip", exclude_self=True)
        np.testing.assert_array_equal(i, bf_i)


def test_accepts_torch_tensors_and_float64():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((30, 8))
    r = rng.standard_normal((50, 8))
    ref = knn(q.astype(np.float32), r.astype(np.float32), 5)
    t = knn(torch.tensor(q, requires_grad=True), torch.from_numpy(r).float(), 5)
    f64 = knn(q, r, 5)
    np.testing.assert_array_equal(ref[1], t[1])
    np.testing.assert_array_equal(ref[1], f64[1])


def test_torch_fallback_when_faiss_missing(monkeypatch):
    monkeypatch.setattr(backends_mod, "_import_faiss", lambda: None)
    assert resolve_backend("auto", "cpu").kind == "torch"
    with pytest.raises(ImportError, match="faiss"):
        resolve_backend("faiss", "cpu")
    q = integer_data(50, 3, seed=10)
    _, i = knn(q, None, 6, "l2", exclude_self=True)
    _, bf_i, _ = brute_force(q, q, 6, "l2", exclude_self=True)
    np.testing.assert_array_equal(i, bf_i)


def test_resolve_backend_on_cpu():
    assert resolve_backend("auto", "cpu").kind == "faiss-cpu"
    assert resolve_backend("torch", "cpu").kind == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("annoy", "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_backend("auto", "not-a-device")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": -3}, "k must be a positive integer"),
        ({"k": 2.5}, "k must be a positive integer"),
        ({"k": 21}, "larger than the number of reference rows"),
        ({"k": 20, "exclude_self": True, "reference": None}, "other than the query itself"),
        ({"metric": "hamming"}, "metric must be one of"),
        ({"backend": "annoy"}, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    rng = np.random.default_rng(11)
    args = {
        "query": rng.standard_normal((20, 4)).astype(np.float32),
        "reference": rng.standard_normal((20, 4)).astype(np.float32),
        "k": 3,
    }
    args.update(kwargs)
    if args.get("exclude_self") and args["reference"] is None:
        args["reference"] = None
    with pytest.raises(ValueError, match=match):
        knn(**args)


def test_bad_inputs():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"query has NaN or Inf in 1 row\(s\) \(first: \[3\]\)"):
        knn(bad, x, 2)
    with pytest.raises(ValueError, match="reference has NaN"):
        knn(x, np.where(np.arange(20)[:, None] == 0, np.inf, x), 2)
    with pytest.raises(ValueError, match="query must be 2-D"):
        knn(x[0], x, 2)
    with pytest.raises(ValueError, match="reference is empty"):
        knn(x, x[:0], 1)
    with pytest.raises(ValueError, match="dimension"):
        knn(x, x[:, :3], 2)
    with pytest.raises(ValueError, match="exclude_self=True needs reference to be the query"):
        knn(x, x[::-1], 2, exclude_self=True)
    with pytest.raises(TypeError, match="query must hold real numbers"):
        knn(np.array([["a", "b"]]), x, 1)
    with pytest.raises(TypeError, match="query is None"):
        knn(None, x, 1)


def test_input_helpers():
    m = as_float_matrix(torch.arange(6, dtype=torch.float64).view(2, 3), "x")
    assert m.dtype == np.float32 and m.flags.c_contiguous and m.shape == (2, 3)
    assert as_float_matrix(np.ones((3, 2), dtype=np.int32), "x").dtype == np.float32
    with pytest.raises(ValueError, match="x has NaN or Inf"):
        as_float_matrix(np.array([[1e300, 0.0]]), "x")  # overflows float32
    y = as_labels(np.array([0.0, 2.0, 1.0]), 3, "y")
    assert y.dtype == np.int64 and y.tolist() == [0, 2, 1]
    assert as_labels(torch.tensor([True, False]), 2, "y").tolist() == [1, 0]
    with pytest.raises(ValueError, match="y must hold integer class ids"):
        as_labels(np.array([0.0, 1.5]), 2, "y")
    with pytest.raises(ValueError, match="y holds NaN"):
        as_labels(np.array([0.0, np.nan]), 2, "y")
    with pytest.raises(ValueError, match="y has 2 entries but its embeddings have 3 rows"):
        as_labels([0, 1], 3, "y")
    with pytest.raises(ValueError, match="y must be 1-D"):
        as_labels(np.zeros((3, 1)), 3, "y")
    with pytest.raises(TypeError, match="np.unique"):
        as_labels(np.array(["cat", "dog"]), 2, "y")


def test_find_duplicates_matches_numpy_unique():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    x[[10, 50, 299]] = x[3]
    x[200] = x[100]
    x[7, 2], x[8, 2] = -0.0, 0.0  # -0.0 and 0.0 are the same value
    x[8] = np.where(np.arange(5) == 2, x[8], x[7])
    x[9] = x[9] + 1e-7  # close but not identical to nothing in particular: stays distinct
    dup = find_duplicates(x)
    _, first, inv = np.unique(x + np.float32(0.0), axis=0, return_index=True, return_inverse=True)
    rep = first[inv.ravel()]
    np.testing.assert_array_equal(np.sort(dup.unique_rows), np.unique(rep))
    groups = {tuple(dup.members[s : s + m]) for s, m in zip(dup.start, dup.mult) if m > 1}
    assert groups == {(3, 10, 50, 299), (100, 200), (7, 8)}
    assert find_duplicates(rng.standard_normal((100, 5)).astype(np.float32)) is None


class _FakeFaiss:
    def __init__(self, gpus):
        self.gpus = gpus

    def get_num_gpus(self):
        return self.gpus


@pytest.mark.parametrize(
    ("gpus", "backend", "k", "kind"),
    [
        (1, "auto", 100, "faiss-gpu"),
        (1, "auto", 2048, "faiss-gpu"),
        (1, "auto", 2049, "torch"),  # past faiss-GPU's k limit: torch top-k on CUDA
        (0, "auto", 100, "torch"),  # faiss without GPUs (faiss-cpu) on a CUDA machine
        (1, "faiss", 5000, "faiss-cpu"),  # faiss forced: its CPU index
        (1, "torch", 10, "torch"),
    ],
)
def test_resolve_backend_on_a_cuda_machine(monkeypatch, gpus, backend, k, kind):
    """The backend choice on a (simulated) CUDA machine; no search runs here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends_mod, "_import_faiss", lambda: _FakeFaiss(gpus))
    plan = resolve_backend(backend, None, k)
    assert plan.kind == kind
    assert plan.device.type == ("cpu" if kind == "faiss-cpu" else "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_cuda_matches_cpu(metric):
    q = integer_data(500, 3, seed=14)
    for backend in ("auto", "torch"):
        s, i = knn(q, None, 40, metric, exclude_self=True, device="cuda", backend=backend)
        bf_s, bf_i, _ = brute_force(q, q, 40, metric, exclude_self=True)
        if metric == "l2":
            np.testing.assert_array_equal(i, bf_i)
        np.testing.assert_allclose(s, bf_s, atol=1e-5)


# --------------------------------------------------------------------------------------------
# large-k block selection (evaluation._topk; search_blocks(..., large_k_blocks=True))

topk_mod = importlib.import_module("evaluation._topk")


@pytest.mark.parametrize(("n", "w"), [(50, 50), (777, 100), (1000, 10), (5003, 7), (20003, 30)])
def test_window_topk_is_a_valid_sorted_window(n, w):
    """Ties everywhere (small integers, +-0.0): every column scoring above the window's worst
    score is in it, values match their columns, order is (score desc, column asc); on distinct
    scores the window is exactly numpy's lexsort top-w. Sizes cover 1 to 4 levels + padding."""
    rng = np.random.default_rng(n)
    width = topk_mod.padded_width(n, w)
    s = np.full((9, width), -np.inf, dtype=np.float32)
    s[:, :n] = rng.integers(-5, 5, size=(9, n))
    s[0, :n] = -0.0
    s[1, ::2] = 0.0  # +0.0 and -0.0 compare equal: ordered by column
    s[2, :n] = rng.permutation(n)  # distinct
    vals, cols = topk_mod.window_topk(s, w)
    assert vals.shape == cols.shape == (9, w)
    for i in range(9):
        assert np.array_equal(vals[i], s[i, cols[i]])
        assert set(np.flatnonzero(s[i] > vals[i, -1])) <= set(cols[i].tolist())
        assert list(zip(-vals[i], cols[i])) == sorted(zip(-vals[i], cols[i]))
        assert len(set(cols[i].tolist())) == w and cols[i].max() < n
    exact = np.lexsort((np.arange(width), -s[2]))[:w]
    assert np.array_equal(cols[2], exact)
    pool = topk_mod.ThreadPoolExecutor(2)
    try:  # row groups on two threads give the same result
        v2, c2 = topk_mod.topk_rows(s, w, pool, 2)
    finally:
        pool.shutdown()
    assert np.array_equal(v2, vals) and np.array_equal(c2, cols)


def _collect(blocks):
    blocks = list(blocks)
    return torch.cat([b[1] for b in blocks]), torch.cat([b[2] for b in blocks])


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize(("n", "d", "k"), [(3001, 8, 20), (900, 4, 250), (400, 2, 390)])
def test_large_k_blocks_match_torch_and_brute_force(monkeypatch, metric, exclude_self, n, d, k):
    """The block path (forced on small data) equals the torch backend and a float64 brute force
    bit for bit, on integer data full of exact ties and duplicate rows (boundary recompute)."""
    monkeypatch.setattr(knn_mod, "BLOCK_SELECT_MIN_K", 1)
    x = integer_data(n, d, seed=n + d)
    self_index = np.arange(n) if exclude_self else None
    seen = []
    monkeypatch.setattr(knn_mod, "_cpu_block_search",
                        lambda *a, _f=knn_mod._cpu_block_search: seen.append(1) or _f(*a))
    key_b, idx_b = _collect(knn_mod.search_blocks(
        x, x, k, metric, self_index, "auto", "cpu", 97, large_k_blocks=True
    ))
    assert seen, "the block path did not run"
    key_t, idx_t = _collect(knn_mod.search_blocks(x, x, k, metric, self_index, "torch", "cpu"))
    assert torch.equal(key_b, key_t) and torch.equal(idx_b, idx_t)
    rows = np.arange(0, n, max(1, n // 60))
    _, order, _ = brute_force(x[rows], x, k, metric)
    if exclude_self:  # brute force without the query's own row
        key = -((x[rows, None].astype(np.float64) - x[None]) ** 2).sum(-1) if metric == "l2" \
            else x[rows].astype(np.float64) @ x.T.astype(np.float64)
        key[np.arange(len(rows)), rows] = -np.inf
        cols = np.broadcast_to(np.arange(n), key.shape)
        order = np.lexsort((cols, -key), axis=1)[:, :k]
    assert np.array_equal(idx_b.numpy()[rows], order)


def test_large_k_blocks_only_when_asked(monkeypatch):
    """knn() and explicit backends keep FAISS / torch; the metrics' auto path switches by k."""
    x = np.random.default_rng(1).standard_normal((300, 3)).astype(np.float32)
    windows = []
    real = knn_mod._cpu_block_search
    monkeypatch.setattr(knn_mod, "_cpu_block_search",
                        lambda *a: windows.append(a[0].window) or real(*a))
    assert knn_mod.BLOCK_SELECT_MIN_K <= 258
    list(knn_mod.search_blocks(x, x, 250, "ip", None, "auto", "cpu", large_k_blocks=True))
    assert windows == [250 + knn_mod.TIE_MARGIN]
    list(knn_mod.search_blocks(x, x, 250, "ip", None, "faiss", "cpu", large_k_blocks=True))
    list(knn_mod.search_blocks(x, x, 5, "ip", None, "auto", "cpu", large_k_blocks=True))
    knn(x, None, 250, "ip")
    assert len(windows) == 1
