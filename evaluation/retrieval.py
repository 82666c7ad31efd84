"""k-NN retrieval metrics: Recall@K, Precision@1, R-Precision and MAP@R.

The metrics follow the deep-metric-learning conventions (Musgrave, Belongie, Lim, "A Metric
Learning Reality Check", ECCV 2020) and equal pytorch-metric-learning's ``AccuracyCalculator``
(``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r`` with
``k="max_bin_count"``) given the same neighbour order. For a query ``q`` with label ``y_q``:

* ``R_q`` = number of reference items labelled ``y_q`` (minus one, the query itself, when the
  query set is the reference set); a query with ``R_q = 0`` is *lone*: it is left out of every
  mean and counted in ``num_lone_queries``.
* ``rel_q(i)`` = 1 if the i-th nearest neighbour (i = 1, 2, ...) has label ``y_q``.
* ``Recall@K = [sum_{i<=K} rel_q(i) > 0]`` (any of the top K shares the label);
  ``Precision@1 = rel_q(1)`` (= Recall@1).
* ``R-Precision = (1/R_q) sum_{i<=R_q} rel_q(i)``.
* ``MAP@R = (1/R_q) sum_{i<=R_q} rel_q(i) P_q(i)``, ``P_q(i) = (1/i) sum_{j<=i} rel_q(j)``.

Each is averaged over the non-lone queries. Only ``k = max(max(ks), max_q R_q)`` neighbours are
searched (the largest class size), never the whole reference set, and queries are processed in
blocks so memory stays ``O(block x k)``. Neighbour order and tie handling are those of
:func:`evaluation.search.knn`: ties broken by lower reference index.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ._inputs import as_float_matrix, as_labels, check_ks, check_metric, check_same_dim
from .backends import KnnBackend, normalize_rows
from .search import SearchedMetrics, search_blocks

__all__ = ["retrieval_metrics", "relevance_counts", "RetrievalMetrics"]


class RetrievalMetrics(SearchedMetrics):
    """The metrics (a plain ``dict`` of numbers, so callers that format or average every value
    keep working) plus the attribute ``backend``: the name of the search that produced them."""


def relevance_counts(
    query_labels: np.ndarray, reference_labels: np.ndarray, same_set: bool
) -> np.ndarray:
    """``R_q``: how many reference items share each query's label (self not counted)."""
    uniq, counts = np.unique(reference_labels, return_counts=True)
    pos = np.searchsorted(uniq, query_labels)
    pos = np.minimum(pos, len(uniq) - 1)
    found = uniq[pos] == query_labels
    r = np.where(found, counts[pos], 0).astype(np.int64)
    return r - 1 if same_set else r


def _block_sums(match: torch.Tensor, r: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Per-block sums of the per-query metrics. ``match`` [B, K] bool, ``r`` [B] int64 >= 1.

    Sparse in the hits: with ``(row, col)`` the relevant items within the first ``R`` (row-major,
    so the ``j``-th hit of a row has ``j`` hits up to it), ``MAP@R`` sums ``j / (col + 1) / R``
    and ``R-Precision`` sums ``1 / R`` over them.
    """
    b, width = match.shape
    dev = match.device
    within = torch.arange(width, device=dev)[None, :] < r[:, None]
    rows, cols = (match & within).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=b)
    first = counts.cumsum(0) - counts
    cum = torch.arange(1, rows.numel() + 1, device=dev) - first[rows]
    inv_r = 1.0 / r.to(torch.float64)
    out = {
        "precision_at_1": match[:, 0].sum(),
        "r_precision": (counts * inv_r).sum(),
        "map_at_r": (cum / (cols + 1).to(torch.float64) * inv_r[rows]).sum(),
    }
    for k in ks:
        out[f"recall_at_{k}"] = match[:, :k].any(dim=1).sum()
    return {name: float(value) for name, value in out.items()}


def retrieval_metrics(
    query: object,
    query_labels: object,
    reference: object = None,
    reference_labels: object = None,
    ks: tuple[int, ...] | list[int] | int = (1, 2, 4, 8),
    metric: str = "cosine",
    backend: str | KnnBackend = "auto",
    device: object = None,
    block_size: int | None = None,
    progress: bool = False,
    index: str = "auto",
    index_options: dict | None = None,
) -> RetrievalMetrics:
    """Recall@K, Precision@1, R-Precision and MAP@R of ``query`` against ``reference``.

    Args:
        query, query_labels: ``[Nq, d]`` embeddings (numpy or torch) and ``[Nq]`` integer labels.
        reference, reference_labels: the gallery; both ``None`` (default) means each query is
            compared with the other queries, its own row excluded. A reference set that is
            passed is searched in full, even if it contains the queries.
        ks: the K of Recall@K, each ``<=`` the number of candidates per query.
        metric: "cosine" | "ip" | "l2" (squared Euclidean), as in :func:`evaluation.search.knn`.
        backend, device, block_size, progress: passed to the k-NN search (``backend``: a
            name or a :class:`~evaluation.backends.KnnBackend` object, e.g. a wrapped PML
            ``knn_func``, see :mod:`evaluation.pml_interop`). On the CPU with
            large classes (the "cpu-blocks" path of :mod:`evaluation.search`) blocks of queries
            are spread over ``torch.get_num_threads()`` Python threads, and torch's intra-op
            thread count is 1 while they run (restored before any code of the caller runs).
        index, index_options: exact or approximate search, as in :func:`evaluation.search.knn`
            ("auto": exact below :data:`evaluation.ann.ANN_MIN_N` reference rows, IVF-Flat
            from there on the CPU; :mod:`evaluation.ann` measures the accuracy cost).

    Returns:
        ``{"precision_at_1", "r_precision", "map_at_r", "recall_at_{k}" for k in ks (floats in
        [0, 1], NaN when every query is lone), "num_queries" (all queries, lone ones included),
        "num_lone_queries"}``, all numbers. See the module docstring for the formulas. The dict's
        ``backend`` attribute names the search that ran (e.g. ``"faiss-cpu IndexFlat exact"``,
        ``"torch exact (cuda:0)"``, ``"faiss-cpu IVF-Flat(nlist=4000, nprobe=16)
        approximate"``; ``"none"`` when every query is lone).

    Raises ``ValueError`` for bad arguments (NaN / Inf embeddings, ``ks`` past the candidates,
    labels that are not class ids) and for ``metric="l2"`` / ``"ip"`` embeddings whose float32
    scores would overflow (row norms near 1e19).
    """
    metric = check_metric(metric)
    ks = check_ks(ks)
    q = as_float_matrix(query, "query")
    yq = as_labels(query_labels, q.shape[0], "query_labels")
    if (reference is None) != (reference_labels is None):
        raise ValueError(
            "pass reference and reference_labels together, or neither (then each query is "
            "compared with the other queries)"
        )
    same_set = reference is None
    if same_set:
        r_emb, yr = q, yq
    else:
        r_emb = as_float_matrix(reference, "reference")
        check_same_dim(q, r_emb, "query", "reference")
        yr = as_labels(reference_labels, r_emb.shape[0], "reference_labels")
    n_cand = r_emb.shape[0] - int(same_set)
    if n_cand < 1:
        raise ValueError("the query set needs at least 2 rows when no reference set is passed")
    if ks[-1] > n_cand:
        raise ValueError(
            f"ks holds {ks[-1]} but each query has only {n_cand} candidate neighbours "
            f"({'the other queries' if same_set else 'the reference rows'}); use ks <= {n_cand}"
        )

    r_q = relevance_counts(yq, yr, same_set)
    active = np.flatnonzero(r_q > 0)
    n_lone = int(q.shape[0] - active.size)
    out = RetrievalMetrics()
    names = ["precision_at_1", "r_precision", "map_at_r"] + [f"recall_at_{k}" for k in ks]
    if active.size == 0:
        out.update({name: float("nan") for name in names})
        out.update(num_queries=int(q.shape[0]), num_lone_queries=n_lone)
        return out

    k = max(ks[-1], int(r_q[active].max()))
    if metric == "cosine":
        q = normalize_rows(q)
        r_emb = q if same_set else normalize_rows(r_emb)
    q_act = q[active] if active.size < q.shape[0] else q
    self_index = active if same_set else None

    labels_dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    lock = threading.Lock()

    def block_sums(rows: slice, _key: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
        dev = idx.device
        with lock:  # runs in the search's worker threads
            if dev not in labels_dev:
                labels_dev[dev] = (
                    torch.from_numpy(yr).to(dev),
                    torch.from_numpy(yq[active]).to(dev),
                    torch.from_numpy(r_q[active]).to(dev),
                )
            yr_t, yq_t, r_t = labels_dev[dev]
        return _block_sums(yr_t[idx] == yq_t[rows, None], r_t[rows], ks)

    totals = dict.fromkeys(names, 0.0)
    info: dict[str, str] = {}
    for _rows, sums in search_blocks(
        q_act, r_emb, k, "l2" if metric == "l2" else "ip", self_index, backend, device,
        block_size, progress, large_k_blocks=True, reduce=block_sums,
        index=index, index_options=index_options, info=info,
    ):
        for name, value in sums.items():
            totals[name] += value
    n = active.size
    out.update({name: float(totals[name]) / n for name in names})
    out.update(num_queries=int(q.shape[0]), num_lone_queries=n_lone)
    out.backend = info.get("backend", "none")
    return out
