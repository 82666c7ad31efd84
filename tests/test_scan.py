"""The optional C scan of the large-k selection (evaluation/_scan.c via evaluation._topk) and the
threaded CPU block search that uses it: every instruction-set kernel against a lexsort brute
force and against the numpy path, ties, signed zeros, overflowing rows, argument errors, torch's
thread count restored, and retrieval metrics equal to the FAISS backend's."""

from __future__ import annotations

import importlib
import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from evaluation.retrieval import retrieval_metrics

topk = importlib.import_module("evaluation._topk")
search = importlib.import_module("evaluation.search")
scan = topk._scan

needs_scan = pytest.mark.skipif(
    scan is None, reason="the C extension evaluation._scan is not built"
)


def test_extension_is_built_where_a_compiler_is_present():
    """`pip install` builds the extension when it can: a C compiler and Python's headers."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    kernel = topk.scan_kernel()
    assert kernel is not None or not (cc and headers), "a compiler is here but _scan is missing"
    assert kernel in {None, "generic", "avx2", "avx512f"}
    assert kernel == (None if scan is None else scan.current())


def brute_topk(s: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-w of each row by (score desc, column asc) with -0.0 == 0.0, by lexsort."""
    cols = np.stack([np.lexsort((np.arange(s.shape[1]), -(row + 0.0)))[:w] for row in s])
    return np.take_along_axis(s, cols, axis=1), cols


def score_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((8, n)).astype(np.float32)
    s[1] = np.round(s[1] * 4) / 4  # heavy ties
    s[2] = 0.0
    s[2, ::3] = -0.0  # signed zeros only: all tie, the row overflows the candidate buffer
    s[3] = np.sort(s[3])  # ascending: the best scores at the end of the row
    s[4] = np.sort(s[4])[::-1]
    s[5, : n // 2] = -np.inf  # half the row -inf (chunk maxima not all finite)
    s[6, 7] = 1e30  # one huge score, then a tiny range
    s[6, 8:] = s[6, 8:] * 1e-6
    return s


@needs_scan
@pytest.mark.parametrize("kernel", [] if scan is None else scan.kernels())
@pytest.mark.parametrize(("n", "w"), [(32 * 5, 5), (32 * 40 + 7, 40), (20_011, 300)])
def test_each_kernel_equals_brute_force_and_numpy_path(kernel, n, w, monkeypatch):
    old = scan.use(kernel)
    try:
        s = score_rows(n, seed=n)
        vals, cols = topk.window_topk(s, w)
    finally:
        scan.use(old)
    ref_vals, ref_cols = brute_topk(s, w)
    np.testing.assert_array_equal(cols, ref_cols)
    np.testing.assert_array_equal(vals, ref_vals)
    # the numpy path: the same values; the same columns except inside a run of scores equal to
    # the window's worst (its contract is a valid window, the caller settles that edge)
    monkeypatch.setattr(topk, "_scan", None)
    np_vals, np_cols = topk.window_topk(s, w)
    np.testing.assert_array_equal(np_vals, vals)
    above = vals > vals[:, -1:]
    np.testing.assert_array_equal(np_cols[above], cols[above])


@needs_scan
def test_scan_keeps_few_candidates_and_flags_overflow():
    """Clustered-looking rows give about w to 2w candidates; a row of equal scores is flagged."""
    rng = np.random.default_rng(0)
    n, w = 30_000, 365
    s = rng.standard_normal((4, n)).astype(np.float32)
    s[3] = 0.5
    cap = 2 * w + 64
    keys = np.empty((4, cap), dtype=np.int64)
    counts = np.empty(4, dtype=np.int64)
    scan.scan_rows(s, 4, n, w, cap, keys, counts)
    assert counts[3] == -1
    assert np.all((counts[:3] >= w) & (counts[:3] <= cap))
    for i in range(3):  # the candidates are exactly the scores >= the threshold they imply
        cand = np.sort(topk._LOW - (keys[i, : counts[i]] & topk._LOW))
        tau = s[i, cand].min()
        np.testing.assert_array_equal(cand, np.flatnonzero(s[i] >= tau))
        assert np.all(keys[i, counts[i] :] == np.iinfo(np.int64).min)


@needs_scan
def test_scan_rows_argument_errors():
    s = np.zeros((2, 64), dtype=np.float32)
    keys = np.empty((2, 8), dtype=np.int64)
    counts = np.empty(2, dtype=np.int64)
    with pytest.raises(TypeError, match="scores must be a C-contiguous float32"):
        scan.scan_rows(s.astype(np.float64), 2, 64, 4, 8, keys, counts)
    with pytest.raises((TypeError, ValueError), match="contiguous"):
        scan.scan_rows(np.zeros((64, 2), np.float32).T, 2, 64, 4, 8, keys, counts)
    with pytest.raises(TypeError, match="keys must be a C-contiguous int64"):
        scan.scan_rows(s, 2, 64, 4, 8, keys.astype(np.int32), counts)
    with pytest.raises(ValueError, match="cap >= w"):
        scan.scan_rows(s, 2, 64, 9, 8, keys, counts)
    with pytest.raises(ValueError, match="smaller than"):
        scan.scan_rows(s, 3, 64, 4, 8, keys, counts)
    with pytest.raises(ValueError, match="not available"):
        scan.use("sse9")
    assert scan.current() in scan.kernels()


# --------------------------------------------------------------------------------------------
# the threaded CPU block search


def clustered(n: int, classes: int, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d)).astype(np.float32)[y]
    x += 1.5 * rng.standard_normal((n, d)).astype(np.float32)
    x[5] = x[17]  # a duplicate pair: the grouped path
    return x, y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_block_search_equals_faiss_and_restores_threads(threads, metric, monkeypatch):
    """Large classes (k ~ 250 >= BLOCK_SELECT_MIN_K): "auto" takes the block path (with the C
    scan, the row being more than 32 k long) on `threads` worker threads; the metrics equal
    the FAISS backend's (to 1e-6: FAISS's own BLAS rounds some near-equal scores the other
    way), and torch's thread count is what it was."""
    x, y = clustered(9000, 40)
    calls = []
    if scan is not None:
        real = topk._scan_topk
        monkeypatch.setattr(topk, "_scan_topk", lambda s, w: calls.append(w) or real(s, w))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        auto = retrieval_metrics(x, y, metric=metric)
        assert torch.get_num_threads() == threads
        faiss = retrieval_metrics(x, y, metric=metric, backend="faiss")
    finally:
        torch.set_num_threads(old)
    assert scan is None or len(calls) > 0  # the C scan served the block path
    assert auto.keys() == faiss.keys()
    for name in auto:
        assert auto[name] == pytest.approx(faiss[name], abs=1e-6), name


def test_block_search_generator_closed_early_restores_threads():
    x, _ = clustered(3000, 5)
    xn = search.normalize_rows(x)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        blocks = search.search_blocks(
            xn, xn, 300, "ip", np.arange(3000), block_size=100, large_k_blocks=True
        )
        rows, key, idx = next(blocks)
        # the workers ran single-threaded torch, but between iterations the caller's code sees
        # its own setting: nothing is held across the yield
        assert torch.get_num_threads() == 2
        assert rows == slice(0, 100) and key.shape == idx.shape == (100, 300)
        blocks.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
