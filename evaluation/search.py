"""Exact k-nearest-neighbour search for evaluation: :func:`knn` and the block iterator
:func:`search_blocks` that the retrieval metrics, the k-NN classifier and the
``AccuracyCalculator`` reduce block by block (none of them holds an ``N_query x N_reference``
matrix).

What lives where:

* :mod:`evaluation.backends` -- the backend protocol (``search(query, reference, k) ->
  (scores, indices)``), its implementations (FAISS CPU/GPU, blockwise torch, the CPU block scan)
  and :func:`resolve_backend`;
* :mod:`evaluation.ties` -- :class:`~evaluation.ties.ExactTies`, exact-tie repair and duplicate
  grouping over any backend (ties broken by lower reference index, see there);
* :mod:`evaluation.pml_interop` -- pytorch-metric-learning ``knn_func`` <-> backend adapters;
* this module -- input checks, the choice of backend, query blocks, and the CPU worker threads.

Scores
    ``metric="cosine"``: cosine similarity (rows are L2-normalised first; an all-zero row has
    similarity 0 with everything), descending. ``metric="ip"``: inner product, descending.
    ``metric="l2"``: **squared** Euclidean distance ``|q - r|^2`` (FAISS's convention), ascending.

Backends (``backend="auto"``)
    * CUDA device and a FAISS build with GPUs: ``GpuIndexFlatIP`` / ``GpuIndexFlatL2`` with queries
      in blocks; past FAISS-GPU's selection limit (k = 2048) a blockwise torch top-k on CUDA.
    * CUDA device and FAISS without GPUs (e.g. ``faiss-cpu``): blockwise torch top-k on CUDA.
    * CPU: ``IndexFlatIP`` / ``IndexFlatL2`` from ``faiss-cpu``; blockwise torch top-k on the CPU
      when ``import faiss`` fails.
    ``backend="faiss"``, ``"torch"`` or ``"blocks"`` (the CPU block scan below, CPU only)
    forces one family (tests use that to compare them); a
    :class:`~evaluation.backends.KnnBackend` object (e.g. a wrapped PML ``knn_func``) is used
    as given. For the retrieval metrics only (``search_blocks(..., large_k_blocks=True)``),
    ``"auto"`` on the CPU with a window of ``k + margin >= BLOCK_SELECT_MIN_K``
    (``>= BLOCK_SCAN_MIN_K`` when the C scan of :mod:`evaluation._topk` is built) takes the
    "cpu-blocks" path: :class:`~evaluation.backends.BlockScanBackend` on blocks of query rows,
    the blocks being tasks for ``torch.get_num_threads()`` Python threads (each one
    single-threaded matrix product and the selection while the scores are in the cache;
    FAISS-CPU's heap costs about as much as the matrix product at such k). The tie repair and
    the per-block reduction of the retrieval metrics run in those threads too.

Thread settings
    The worker threads need torch single-threaded; that setting is applied inside one function
    (:func:`run_single_threaded`) around a batch of tasks and restored before it returns, never
    held across a ``yield``: the caller's code between iterations sees its own settings.

``exclude_self=True`` (the query set is the reference set) removes each query's own row by
index, not by distance, so a duplicate of the query stays a valid neighbour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import backends as _backends
from ._inputs import check_k, check_metric, check_score_range, query_and_reference
from ._topk import SCAN_MIN_RATIO, padded_width, scan_kernel
from .backends import (  # noqa: F401 - re-exported: the names this module has always had
    _CPU_BLOCK_BYTES,
    _GPU_BLOCK_BYTES,
    BACKENDS,
    FAISS_GPU_MAX_K,
    KnnBackend,
    Plan,
    _import_faiss,
    _resolve_device,
    block_keys,
    describe_plan,
    make_backend,
    normalize_rows,
    resolve_backend,
)
from .ties import (  # noqa: F401 - re-exported
    TIE_MARGIN,
    Duplicates,
    TieSearch,
    expand_groups,
    expand_sorted_groups,
    find_duplicates,
    select_topk,
    sort_by_key_then_index,
)

__all__ = ["knn", "search_blocks", "resolve_backend", "normalize_rows", "BACKENDS",
           "run_single_threaded", "SearchedMetrics"]


class SearchedMetrics(dict):
    """Metrics computed from a neighbour search: a plain ``dict`` of numbers (so callers that
    format or average every value keep working) plus the attribute ``backend``, the name of the
    search that ran (e.g. ``"faiss-cpu IndexFlat exact"``; ``"none"`` when none did). The base
    of :class:`~evaluation.retrieval.RetrievalMetrics`,
    :class:`~evaluation.weighted_knn.KnnClassifierResult` and
    :class:`~evaluation.accuracy_calculator.AccuracyResult`."""

    backend: str = "none"

_FAISS_OUT_BYTES = 1 << 26  # (scores, ids) returned by one FAISS search call
#: smallest window (k + tie margin) for which ``large_k_blocks`` leaves FAISS-CPU's heap, with
#: the numpy selection (measured crossover at 30k x 128 on 2 cores: FAISS faster at 163, blocks
#: faster from 218) ...
BLOCK_SELECT_MIN_K = 200
#: ... and with the C scan (at 30k x 128: FAISS 7% faster at window 25, blocks 8% faster at 130
#: and as fast at 56)
BLOCK_SCAN_MIN_K = 48
#: rows per task of the CPU block search (measured at 30k and 100k x 128 on 2 cores: 400-500
#: rows are within 3% of the best, 250 rows cost 7% more at 100k)
CPU_TASK_ROWS = 512
_CPU_TASKS_BYTES = 512 << 20
#: results of the CPU block search held between two batches of tasks (no ``reduce``)
_CPU_RESULT_BYTES = 256 << 20


def _cpu_task_rows(width: int, parts: int) -> int:
    """Query rows per worker task: large enough that MKL streams the reference matrix rarely
    (at most :data:`CPU_TASK_ROWS`), small enough that ``parts`` tasks hold at most
    :data:`_CPU_TASKS_BYTES` of scores (but at least 32 MiB each)."""
    budget = max(32 << 20, _CPU_TASKS_BYTES // parts)
    return max(16, min(CPU_TASK_ROWS, budget // (4 * width)))


@contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads to ``n`` inside the block, restore them after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_single_threaded(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items) -> list:
    """``[fn(x) for x in items]`` on ``pool``'s threads, with torch's intra-op thread count at 1
    (each task keeps to one core) while they run; restored before this function returns, also
    on error."""
    with torch_threads(1):
        return list(pool.map(fn, items))


def _cpu_block_search(run: TieSearch, query: np.ndarray, self_all: Tensor | None,
                      block_size: int | None, reduce, bar) -> Iterator:
    """Blocks of query rows as tasks for ``torch.get_num_threads()`` Python threads, each:
    :class:`~evaluation.backends.BlockScanBackend` (one single-threaded matrix product, then
    :func:`evaluation._topk.topk_rows` on the scores while they are still in the cache), the tie
    repair, and ``reduce``.

    Why threads rather than one parallel matrix product followed by a parallel selection: the
    OpenMP workers of the product spin after it returns and take the cores the selection
    needs, and a whole block of scores no longer fits in the cache (measured at 30k x 128 on
    2 cores: 1.48 s against 1.85 s). Tasks run in batches (all of them with ``reduce``, whose
    results are small; else about :data:`_CPU_RESULT_BYTES` of results) by
    :func:`run_single_threaded`, and a batch's results are yielded after it returns.
    """
    nq = query.shape[0]
    width = padded_width(run.n_searched, run.window)
    parts = max(1, torch.get_num_threads())
    step = block_size or _cpu_task_rows(width, parts)
    q_all = torch.from_numpy(query)

    def task(s: int):
        rows = slice(s, min(nq, s + step))
        key, idx = run.block(q_all[rows], None if self_all is None else self_all[rows])
        bar.update(rows.stop - rows.start)
        return (rows, key, idx) if reduce is None else (rows, reduce(rows, key, idx))

    starts = list(range(0, nq, step))
    if parts == 1 or len(starts) == 1:
        for s in starts:
            yield task(s)
        return
    per_batch = len(starts) if reduce is not None else \
        max(parts, _CPU_RESULT_BYTES // (step * run.k * 16))
    with ThreadPoolExecutor(parts) as pool:
        for b0 in range(0, len(starts), per_batch):
            yield from run_single_threaded(pool, task, starts[b0 : b0 + per_batch])


def _query_step(plan: Plan, impl: KnnBackend, nq: int, n_s: int, window: int, out_bytes: int,
                block_size: int | None) -> int:
    """Query rows per backend call: the output (and for torch the score block) in budget."""
    if block_size:
        return block_size
    if plan.kind == "torch":
        budget = _backends._GPU_BLOCK_BYTES if plan.device.type == "cuda" else \
            _backends._CPU_BLOCK_BYTES
        chunk = impl.chunk_rows(nq, n_s, window)  # type: ignore[attr-defined]
        return max(1, min(nq, budget // (4 * chunk), budget // out_bytes))
    return max(1, min(nq, _FAISS_OUT_BYTES // out_bytes))


def _choose(backend: str | KnnBackend, device: object, metric: str, window: int, wide: int,
            n_s: int, large_k_blocks: bool) -> tuple[Plan, KnnBackend | None]:
    """The plan, and the backend object when the caller passed one."""
    if not isinstance(backend, str):
        if getattr(backend, "metric", metric) != metric:
            raise ValueError(
                f"the backend object searches metric={backend.metric!r} but this search needs "
                f"{metric!r} (cosine searches 'ip' over normalised rows)"
            )
        dev = torch.device("cpu") if device is None else _resolve_device(device)
        return Plan("custom", dev), backend
    plan = resolve_backend(backend, device, window)
    if large_k_blocks and backend == "auto" and plan.kind == "faiss-cpu":
        scan = scan_kernel() is not None and n_s >= SCAN_MIN_RATIO * window
        if wide >= (min(BLOCK_SCAN_MIN_K, BLOCK_SELECT_MIN_K) if scan else BLOCK_SELECT_MIN_K):
            plan = Plan("cpu-blocks", plan.device)
    return plan, None


def search_blocks(
    query: np.ndarray,
    reference: np.ndarray,
    k: int,
    metric: str,
    self_index: np.ndarray | None = None,
    backend: str | KnnBackend = "auto",
    device: object = None,
    block_size: int | None = None,
    progress: bool = False,
    large_k_blocks: bool = False,
    reduce: Callable[[slice, Tensor, Tensor], Any] | None = None,
    index: str = "exact",
    index_options: dict | None = None,
    info: dict | None = None,
) -> Iterator[tuple[slice, Tensor, Tensor]] | Iterator[tuple[slice, Any]]:
    """Yield ``(rows, key [B, k], idx [B, k])`` for consecutive blocks of query rows.

    ``query``/``reference``: validated float32 arrays, already normalised for cosine;
    ``metric`` in {"ip", "l2"}; ``key`` is the score for ip and minus the squared distance for
    l2 (higher = nearer), sorted by (key desc, index asc). ``self_index[i]`` is the reference row
    to leave out for query ``i`` (-1: none); the caller checks that ``k`` neighbours exist.
    Tensors live on the CPU for FAISS and on the search device for torch. Embeddings whose
    float32 scores would overflow are a ``ValueError``
    (:func:`evaluation._inputs.check_score_range`).

    ``backend``: a name (see the module docstring) or a
    :class:`~evaluation.backends.KnnBackend` object whose ``metric`` is ``metric``.
    ``large_k_blocks``: with ``backend="auto"`` on the CPU and a window of at least
    :data:`BLOCK_SELECT_MIN_K`, use :class:`~evaluation.backends.BlockScanBackend` in worker
    threads instead of FAISS's heap (kind "cpu-blocks").

    ``reduce``: yield ``(rows, reduce(rows, key, idx))`` instead; on the "cpu-blocks" path it
    runs in the worker threads, in parallel (it must be thread-safe and use torch ops, which
    run single-threaded there, or numpy).

    ``index``/``index_options``: "exact", or an approximate FAISS index chosen as in
    :mod:`evaluation.ann` (which then runs the search). A backend object always searches
    exactly: ``index="auto"`` means exact for it, and an approximate ``index`` or any
    ``index_options`` with it is a ``ValueError`` (never silently ignored). ``info``: a dict
    that receives ``info["backend"]``, the name of the search that ran (:func:`describe_plan`,
    or :meth:`evaluation.ann.AnnParams.describe`).
    """
    from .ann import ann_search_blocks, resolve_index  # lazy: evaluation.ann imports this module

    nq = query.shape[0]
    has_self = self_index is not None
    check_score_range(query, reference, metric)
    if not isinstance(backend, str) and (index not in ("auto", "exact") or index_options):
        raise ValueError(
            f"backend={getattr(backend, 'name', type(backend).__name__)!r} is a backend object, "
            f"which runs its own exact search, so index={index!r}"
            + (f" and index_options={index_options!r}" if index_options else "")
            + " cannot apply to it; pass index='exact' (or 'auto') without index_options to "
            "search with the object, or a backend name ('auto' or 'faiss') for an approximate "
            "FAISS index"
        )
    if isinstance(backend, str):
        ann = resolve_index(index, reference.shape[0], reference.shape[1], k + int(has_self),
                            backend, device, index_options)
        if ann is not None:
            if info is not None:
                info["backend"] = ann.describe()
            yield from ann_search_blocks(
                query, reference, k, metric, ann, self_index, block_size, progress, reduce
            )
            return
    dup = find_duplicates(reference)
    n_s = reference.shape[0] if dup is None else dup.unique_rows.size
    window = min(n_s, k + int(has_self) + TIE_MARGIN)
    # by the window over the items, not over the distinct rows: with many duplicates the work
    # is in expanding groups to k items and in `reduce`, which run in the workers
    wide = min(reference.shape[0], k + int(has_self) + TIE_MARGIN)
    plan, impl = _choose(backend, device, metric, window, wide, n_s, large_k_blocks)
    if impl is None:
        impl = make_backend(plan, metric, query_rows=nq)
    run = TieSearch(impl, reference, k, has_self, plan.device, dup=dup)
    if info is not None:
        info["backend"] = describe_plan(plan, impl)
    self_all = torch.from_numpy(np.asarray(self_index, dtype=np.int64)) if has_self else None
    # bytes per query row of a block's window and, with duplicates, of its expansion to
    # k + 1 items (about six int64 temporaries each)
    out_bytes = max(window * 12, 0 if dup is None else (k + 1) * 48)

    bar = tqdm(total=nq, desc=f"knn ({plan.kind})", unit="query", disable=not progress)
    try:
        if plan.kind == "cpu-blocks":
            yield from _cpu_block_search(run, query, self_all, block_size, reduce, bar)
            return
        step = _query_step(plan, impl, nq, n_s, window, out_bytes, block_size)
        q_all = torch.from_numpy(query)
        for s in range(0, nq, step):
            rows = slice(s, min(nq, s + step))
            key, idx = run.block(q_all[rows], None if self_all is None else self_all[rows])
            yield (rows, key, idx) if reduce is None else (rows, reduce(rows, key, idx))
            bar.update(rows.stop - rows.start)
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# public API


def knn(
    query: object,
    reference: object,
    k: int,
    metric: str = "cosine",
    exclude_self: bool = False,
    device: object = None,
    block_size: int | None = None,
    backend: str | KnnBackend = "auto",
    progress: bool = False,
    index: str = "auto",
    index_options: dict | None = None,
    return_backend: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, str]:
    """The k nearest neighbours of each query row in ``reference``: exact, or approximate for
    large reference sets (``index``).

    Args:
        query: ``[Nq, d]`` numpy array or torch tensor.
        reference: ``[Nr, d]``; ``None`` means the query set itself.
        k: neighbours per query, ``1 <= k <= Nr`` (``Nr - 1`` with ``exclude_self``).
        metric: "cosine" | "ip" (similarities, descending) | "l2" (squared distances, ascending).
        exclude_self: the query set is the reference set (same rows, same order); leave each
            query's own row out, by index.
        device: where to search (default: CUDA when torch sees a GPU, else the CPU).
        block_size: query rows per block (default: sized to keep a block's scores near
            128 MiB on CPU / 1 GiB on GPU).
        backend: "auto" | "faiss" | "torch" | "blocks" (see the module docstring), or a
            :class:`~evaluation.backends.KnnBackend` object (e.g.
            :class:`evaluation.pml_interop.PmlBackend` around a PML ``knn_func``) whose
            ``metric`` is "ip" for cosine / ip and "l2" for l2; ties and duplicates are then
            handled as for the built-in backends.
        progress: show a tqdm bar over query blocks.
        index: "auto" (exact below :data:`evaluation.ann.ANN_MIN_N` reference rows, on a CUDA
            device or without FAISS; IVF-Flat otherwise) | "exact" | "ivf" | "ivfpq" | "hnsw"
            (approximate FAISS-CPU indexes, see :mod:`evaluation.ann`).
        index_options: settings of the approximate index, e.g. ``{"nlist": 4000, "nprobe": 32}``
            (defaults by N in :mod:`evaluation.ann`). With a backend object (always exact)
            ``index`` must be "auto" or "exact" and ``index_options`` empty, else ``ValueError``.
        return_backend: also return the name of the search that ran, e.g.
            ``"faiss-cpu IndexFlat exact"`` or ``"faiss-cpu IVF-Flat(nlist=4000, nprobe=16)
            approximate"``.

    Returns:
        ``(scores float32 [Nq, k], indices int64 [Nq, k])`` as numpy arrays, nearest first,
        ties broken by lower reference index (``+ (backend,)`` with ``return_backend``).
        Approximate indexes may miss true neighbours and break ties only among the candidates
        they return (:mod:`evaluation.ann`).

    Raises ``ValueError`` for NaN / Inf embeddings and for finite ones whose float32 scores
    would overflow (``metric="l2"`` or ``"ip"`` with row norms near 1e19): rescale them, or use
    ``metric="cosine"``.
    """
    metric = check_metric(metric)
    q, r = query_and_reference(query, reference)
    self_index = None
    if exclude_self:
        if r is not q and (r.shape != q.shape or not np.array_equal(r, q)):
            raise ValueError(
                "exclude_self=True needs reference to be the query set itself (same rows, same "
                "order); pass reference=None, or exclude_self=False for a separate reference set"
            )
        r = q
        self_index = np.arange(q.shape[0], dtype=np.int64)
    avail = r.shape[0] - int(exclude_self)
    if avail < 1:
        raise ValueError("exclude_self=True needs at least 2 rows: each query needs a neighbour")
    k = check_k(k, "k", upper=avail, upper_what="the number of reference rows"
                + (" other than the query itself" if exclude_self else ""))
    info: dict[str, str] = {}
    scores, indices = search_all(
        q, r, k, metric, self_index, backend, device, block_size, progress, index,
        index_options, info,
    )
    if return_backend:
        return scores, indices, info.get("backend", "none")
    return scores, indices


def search_all(
    q: np.ndarray,
    r: np.ndarray,
    k: int,
    metric: str,
    self_index: np.ndarray | None = None,
    backend: str | KnnBackend = "auto",
    device: object = None,
    block_size: int | None = None,
    progress: bool = False,
    index: str = "exact",
    index_options: dict | None = None,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` on validated float32 arrays (``metric`` "cosine" | "ip" | "l2"; rows not yet
    normalised; ``self_index[i]``: the reference row left out for query ``i``): ``(scores
    [Nq, k], indices [Nq, k])`` in the public convention (l2: squared distances ascending)."""
    if metric == "cosine":
        same = r is q
        q = normalize_rows(q)
        r = q if same else normalize_rows(r)
    search_metric = "l2" if metric == "l2" else "ip"
    nq = q.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    indices = np.empty((nq, k), dtype=np.int64)
    for rows, key, idx in search_blocks(
        q, r, k, search_metric, self_index, backend, device, block_size, progress,
        index=index, index_options=index_options, info=info,
    ):
        if metric == "l2":
            key = (-key).clamp_(min=0.0)
        scores[rows] = key.cpu().numpy()
        indices[rows] = idx.cpu().numpy()
    return scores, indices
