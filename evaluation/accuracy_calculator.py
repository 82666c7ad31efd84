"""pytorch-metric-learning's ``AccuracyCalculator``, computed by this package's exact search.

A drop-in for ``pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator`` (PML 2.x):
the same constructor options (``include``, ``exclude``, ``avg_of_avgs``, ``return_per_class``,
``k``), the same ``get_accuracy(query, query_labels, reference, reference_labels,
ref_includes_query)`` call, the same result keys and the same default distance (squared L2 on
the raw embeddings, as PML's ``FaissKNN`` with ``IndexFlatL2``). The neighbours come from
:func:`evaluation.search.search_blocks` (FAISS, blockwise torch or the CPU block path, ties
broken by lower reference index) and only as many as the requested metrics need are searched;
PML's default ``k=None`` makes PML rank the whole reference set.

Definitions (Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020), for a query
``q`` with ``R_q`` relevant reference items (same label; minus one, the query itself, when
``ref_includes_query``), ``rel_q(i)`` = 1 if its i-th neighbour shares its label, ``K`` the
searched depth (``k``: ``"max_bin_count"`` = the largest class among the query labels, minus
one with ``ref_includes_query``; ``None`` = every reference item; an int) and
``P_q(i) = (1/i) sum_{j<=i} rel_q(j)``:

* ``precision_at_1 = rel_q(1)``;
* ``r_precision = (1/m) sum_{i<=m} rel_q(i)`` with ``m = min(R_q, K)``;
* ``mean_average_precision_at_r = (1/R_q) sum_{i<=min(R_q, K)} rel_q(i) P_q(i)``;
* ``mean_average_precision = (1/R_q) sum_{i<=K} rel_q(i) P_q(i)`` (average precision over the
  first K neighbours; the full AP with ``k=None``);
* ``mean_reciprocal_rank = 1 / (rank of the first relevant neighbour)``, 0 when none is
  within K (Voorhees, TREC-8 QA, 1999);
* ``NMI`` / ``AMI``: k-means of the raw query embeddings (squared L2, whatever ``metric``)
  with one cluster per query label, scored by scikit-learn's normalized / adjusted mutual
  information (see :mod:`evaluation.clustering`).

Queries whose label has no other item in the reference set ("lone") are left out. Each metric is
the mean over the remaining queries, or with ``avg_of_avgs`` the mean of the per-class means,
or with ``return_per_class`` the list of per-class means in ascending label order.

Differences from PML: labels are integer class ids (one per row; PML also takes
multi-dimensional labels and a ``label_comparison_fn``, not supported here); the distance is
chosen with ``metric="l2" | "ip" | "cosine"`` rather than a ``knn_func`` object; subclasses
cannot add ``calculate_*`` metrics. ``k`` larger than the reference set is an error (PML's
FAISS call pads with index -1). NMI/AMI use FAISS k-means with PML's seed and iteration count
on the raw embeddings, so on the CPU they match PML's default clustering (PML's ``FaissKMeans``
does not depend on ``knn_func``: ``metric="cosine"`` here, like ``CustomKNN(CosineSimilarity())``
there, changes the neighbours, not the clustering); with a ``kmeans_func`` both use that.
:func:`evaluation.clustering.clustering_metrics` (the ``nmi`` / ``ami`` of
``evaluate_embedder`` and the comparison tables) is a different protocol: spherical k-means on
L2-normalised rows by default.

Equality with PML holds for the same neighbour order. Exact ties are ordered by reference index
in both (PML's FAISS flat index keeps index order for equal distances). Distinct neighbours
whose float32 distances differ by less than float32 rounding may be ordered differently by two
correct implementations (PML computes embeddings in float32 whatever the input dtype): on
10,000 x 64 clustered points one such pair at an R boundary moved ``r_precision`` by 1.0e-6.
``backend="faiss"`` searches PML's own index type (``IndexFlatL2``) and reproduces its
distances; the default ``"auto"`` takes the faster CPU block path for large classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from ._inputs import as_float_matrix, as_labels, check_metric, check_same_dim, check_score_range
from .backends import (
    _CPU_BLOCK_BYTES,
    _GPU_BLOCK_BYTES,
    BACKENDS,
    KnnBackend,
    Plan,
    _resolve_device,
    block_keys,
    describe_plan,
    normalize_rows,
)
from .clustering import kmeans_assign
from .retrieval import relevance_counts
from .search import SearchedMetrics, search_blocks
from .ties import find_duplicates

__all__ = ["AccuracyCalculator", "AccuracyResult", "METRICS", "KNN_METRICS", "CLUSTERING_METRICS",
           "knn_values"]

LOGGER = logging.getLogger(__name__)

#: every metric, in PML's result order
METRICS = (
    "AMI",
    "NMI",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
CLUSTERING_METRICS = ("AMI", "NMI")
KNN_METRICS = tuple(m for m in METRICS if m not in CLUSTERING_METRICS)
#: metrics that may need neighbours past the largest class (all of K)
_DEEP = ("mean_average_precision", "mean_reciprocal_rank")
#: FAISS's default k-means seed, which PML's FaissKMeans keeps
KMEANS_SEED = 1234


def knn_values(
    match: torch.Tensor, r: torch.Tensor, depth: int, names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per-query metric values (float64 ``[B]``) from the relevance of the first neighbours.

    ``match`` [B, W] bool: ``rel_q(i)`` for i = 1..W; ``r`` [B] int64 >= 1: ``R_q``; ``depth``:
    ``K``, with ``W >= min(K, max R_q)`` and ``W >= K`` when a metric of ``_DEEP`` is asked for
    (see the module docstring for the formulas).
    """
    b, w = match.shape
    dev = match.device
    cols = torch.arange(w, device=dev)
    inv_rank = 1.0 / (cols + 1).to(torch.float64)
    r64 = r.to(torch.float64)
    out: dict[str, torch.Tensor] = {}
    if "precision_at_1" in names:
        out["precision_at_1"] = match[:, 0].to(torch.float64)
    if "r_precision" in names or "mean_average_precision_at_r" in names:
        m = r.clamp(max=depth)
        within = match & (cols[None, :] < m[:, None])
        if "r_precision" in names:
            out["r_precision"] = within.sum(1).to(torch.float64) / m.to(torch.float64)
        if "mean_average_precision_at_r" in names:
            hits = within.cumsum(1).to(torch.float64).mul_(within).mul_(inv_rank)
            out["mean_average_precision_at_r"] = hits.sum(1) / r64
    if "mean_average_precision" in names or "mean_reciprocal_rank" in names:
        deep = match[:, :depth]
        if "mean_average_precision" in names:
            hits = deep.cumsum(1).to(torch.float64).mul_(deep).mul_(inv_rank[: deep.shape[1]])
            out["mean_average_precision"] = hits.sum(1) / r64
        if "mean_reciprocal_rank" in names:
            first = deep.to(torch.uint8).argmax(dim=1)
            out["mean_reciprocal_rank"] = torch.where(
                deep.any(dim=1), inv_rank[first], torch.zeros((), dtype=torch.float64, device=dev)
            )
    return out


def _packed_keys(key: torch.Tensor) -> torch.Tensor:
    """int64 whose order is (key desc, column asc) read as ascending integers: the float's
    order-preserving bits (``-0.0`` as ``+0.0``) above ``2^32 - 1 - column``."""
    bits = (key + 0.0).view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    cols = torch.arange(key.shape[1], device=key.device, dtype=torch.int64)
    return (bits.to(torch.int64) << 32) | (0xFFFFFFFF - cols)


def relevant_ranks(
    key: torch.Tensor, rel_idx: torch.Tensor, n_rel: torch.Tensor, self_rows: torch.Tensor | None
) -> torch.Tensor:
    """Ranks (1-based, ascending) of each query's relevant items in its whole ranking.

    ``key`` [B, N]: scores of every reference item (higher = nearer; items ranked by (key desc,
    index asc)); ``rel_idx`` [B, M]: the relevant items' indices, the first ``n_rel[b]`` of row
    ``b`` real (the rest ignored); ``self_rows`` [B]: an item left out of the ranking (or
    ``None``; it may be among the relevant ones). Returns ``[B, M]``: row ``b``'s first
    ``n_rel[b]`` entries (one fewer when its self item is relevant) are the relevant items'
    ranks, the rest meaningless. The rank of a relevant item is one plus the number of items
    ranked before it: with the relevant keys sorted, one binary search per item finds how many
    relevant keys it precedes, and a histogram of those counts gives every rank at once:
    ``O(N log M)`` per query, no sort of the ranking.
    """
    b, m = rel_idx.shape
    dev = key.device
    low = torch.iinfo(torch.int64).min
    packed = _packed_keys(key)
    if self_rows is not None:
        packed.scatter_(1, self_rows[:, None], low)  # never ranked, never ahead of anything
    rel = packed.gather(1, rel_idx)
    pad = torch.arange(m, device=dev)[None, :] >= n_rel[:, None]
    rel = rel.masked_fill_(pad, low).sort(dim=1).values  # ascending; pads and self first
    pos = torch.searchsorted(rel, packed)  # relevant keys below each item's key
    pos += torch.arange(b, device=dev)[:, None] * (m + 1)
    hist = torch.bincount(pos.view(-1), minlength=b * (m + 1)).view(b, m + 1)
    ahead = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [t]: items above the t-th relevant key
    return (ahead + 1).flip(1)  # descending relevant keys: ascending ranks


def rank_values(
    ranks: torch.Tensor, r: torch.Tensor, depth: int, names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per-query metric values (float64 ``[B]``) from the ranks of the relevant items
    (:func:`relevant_ranks`, ``[B, M]``, the first ``r[b] = R_q`` valid); formulas as
    :func:`knn_values`."""
    b, m = ranks.shape
    dev = ranks.device
    j = torch.arange(1, m + 1, device=dev)
    valid = j[None, :] <= r[:, None]
    prec = j.to(torch.float64)[None, :] / ranks.to(torch.float64)  # P_q at each relevant rank
    r64 = r.to(torch.float64)
    out: dict[str, torch.Tensor] = {}
    if "precision_at_1" in names:
        out["precision_at_1"] = (ranks[:, 0] == 1).to(torch.float64)
    lim = r.clamp(max=depth)
    within = valid & (ranks <= lim[:, None])
    if "r_precision" in names:
        out["r_precision"] = within.sum(1).to(torch.float64) / lim.to(torch.float64)
    if "mean_average_precision_at_r" in names:
        out["mean_average_precision_at_r"] = (prec * within).sum(1) / r64
    if "mean_average_precision" in names:
        out["mean_average_precision"] = (prec * (valid & (ranks <= depth))).sum(1) / r64
    if "mean_reciprocal_rank" in names:
        first = ranks[:, 0]
        out["mean_reciprocal_rank"] = torch.where(
            first <= depth, 1.0 / first.to(torch.float64),
            torch.zeros((), dtype=torch.float64, device=dev),
        )
    return out


class AccuracyResult(SearchedMetrics):
    """:meth:`AccuracyCalculator.get_accuracy`'s result: PML's plain ``{name: value}`` dict,
    plus the attribute ``backend``, the name of the neighbour search that ran (e.g.
    ``"faiss-cpu IndexFlat exact"``; ``"torch exact (cpu), full ranking"`` when MAP or MRR rank
    every reference item; ``"none"`` when no search ran: clustering metrics only, or every
    query lone)."""


def _use_ranks(deep: bool, depth: int, max_r: int) -> bool:
    """Rank the relevant items (:func:`relevant_ranks`) rather than search a top-``depth``
    window: when MAP or MRR look past the largest class (``k=None`` ranks everything)."""
    return deep and depth > max_r


def _average(values: np.ndarray, labels: np.ndarray, avg_of_avgs: bool, per_class: bool):
    """Mean over queries, mean of per-class means, or the list of per-class means."""
    if not (avg_of_avgs or per_class):
        return float(values.mean())
    uniq, inv = np.unique(labels, return_inverse=True)
    means = np.bincount(inv, weights=values) / np.bincount(inv)
    return [float(v) for v in means] if per_class else float(means.mean())


class AccuracyCalculator:
    """Retrieval and clustering metrics with PML's ``AccuracyCalculator`` interface.

    Args:
        include, exclude: tuples (or lists) of metric names from :data:`METRICS`; ``include=()``
            means all of them. ``exclude`` removes names.
        avg_of_avgs: average the per-class means instead of the queries (clustering metrics
            are not per class and stay as they are).
        return_per_class: return a list of per-class means (ascending label) per metric.
        k: how many neighbours are ranked: ``None`` (the whole reference set, PML's default),
            ``"max_bin_count"`` (the largest class among the query labels) or a positive int.
            Only the metrics' needs are searched: ``precision_at_1``, ``r_precision`` and
            ``mean_average_precision_at_r`` never look past ``min(K, max R_q)``.
        label_comparison_fn, knn_func: PML's hooks; only ``None`` is accepted (compare labels
            as integer class ids; choose the distance with ``metric``).
        device: where to search (default: CUDA when torch sees a GPU, else the CPU).
        kmeans_func: ``f(query [N, d] float32 tensor, n_clusters) -> cluster ids [N]`` for
            NMI/AMI; default FAISS k-means on the raw embeddings (20 iterations, seed 1234, as
            PML's FaissKMeans; scikit-learn's k-means without FAISS).
        metric: "l2" (squared Euclidean on the raw embeddings, PML's default), "ip" (inner
            product) or "cosine": the distance of the neighbour search only; NMI/AMI cluster the
            raw embeddings whatever the metric, as PML does whatever its ``knn_func``.
        backend, block_size: passed to :func:`evaluation.search.search_blocks`; ``backend`` is
            one of ``"auto"``, ``"faiss"``, ``"torch"``, ``"blocks"`` (checked here) or a
            :class:`~evaluation.backends.KnnBackend` object. When MAP or MRR must rank past the
            largest class (e.g. the default ``k=None``) every score row is computed by torch on
            ``device`` (exact, the same order) whatever ``backend``.
    """

    def __init__(
        self,
        include: tuple[str, ...] | list[str] = (),
        exclude: tuple[str, ...] | list[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = None,
        label_comparison_fn: Callable | None = None,
        device: object = None,
        knn_func: object = None,
        kmeans_func: Callable | None = None,
        *,
        metric: str = "l2",
        backend: str | KnnBackend = "auto",
        block_size: int | None = None,
    ) -> None:
        self._check_names(include, "include")
        self._check_names(exclude, "exclude")
        if avg_of_avgs and return_per_class:
            raise ValueError("avg_of_avgs and return_per_class are mutually exclusive; pick one")
        if not (k is None or k == "max_bin_count" or (
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > 0
        )):
            raise ValueError(f"k must be None, 'max_bin_count' or a positive integer, got {k!r}")
        if label_comparison_fn is not None:
            raise NotImplementedError(
                "label_comparison_fn is not supported: labels are compared as integer class ids; "
                "map other labels to ids first, e.g. np.unique(labels, return_inverse=True)"
            )
        if knn_func is not None:
            raise NotImplementedError(
                "knn_func is not supported: the exact search is built in; choose the distance "
                "with metric='l2' (PML's default FaissKNN), 'ip' or 'cosine'"
            )
        if kmeans_func is not None and not callable(kmeans_func):
            raise TypeError("kmeans_func must be callable: f(embeddings, n_clusters) -> ids")
        if (isinstance(backend, str) or not isinstance(backend, KnnBackend)) and \
                backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {BACKENDS} (or a KnnBackend object), got {backend!r}"
            )
        self.metric = check_metric(metric)
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.avg_of_avgs = bool(avg_of_avgs)
        self.return_per_class = bool(return_per_class)
        self.k = int(k) if isinstance(k, (int, np.integer)) else k
        self.device = device
        self.kmeans_func = kmeans_func
        self.backend = backend
        self.block_size = block_size
        self.metrics = self._select(self.include, self.exclude, METRICS)

    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _check_names(names: object, what: str) -> None:
        if not isinstance(names, (tuple, list)):
            raise TypeError(f"{what} must be a tuple or list of metric names, got "
                            f"{type(names).__name__}")
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"{what} holds unsupported metric(s) {unknown}; supported: "
                             f"{list(METRICS)}")

    @staticmethod
    def _select(include, exclude, available) -> tuple[str, ...]:
        wanted = include if len(include) else available
        return tuple(m for m in available if m in wanted and m not in exclude)

    def get_curr_metrics(self) -> list[str]:
        """The metrics :meth:`get_accuracy` computes (PML's name for it)."""
        return list(self.metrics)

    def requires_knn(self) -> list[str]:
        return list(KNN_METRICS)

    def requires_clustering(self) -> list[str]:
        return list(CLUSTERING_METRICS)

    # ----------------------------------------------------------------------------------------

    def get_accuracy(
        self,
        query: object,
        query_labels: object,
        reference: object = None,
        reference_labels: object = None,
        ref_includes_query: bool = False,
        include: tuple[str, ...] | list[str] = (),
        exclude: tuple[str, ...] | list[str] = (),
    ) -> dict[str, float | list[float]]:
        """The metrics of ``query`` against ``reference`` (see the module docstring).

        Args:
            query, query_labels: ``[Nq, d]`` embeddings (numpy or torch) and ``[Nq]`` integer
                labels.
            reference, reference_labels: the gallery; ``None`` means the query set, each
                query's own row left out (``ref_includes_query=True``).
            ref_includes_query: the first ``Nq`` rows of ``reference`` are the queries (as in
                PML, checked with ``allclose``); query ``i``'s row ``i`` is left out, by index.
            include, exclude: restrict this call to a subset of the constructor's metrics.

        Returns:
            ``{name: float}`` (or ``{name: [float per class]}`` with ``return_per_class``) in
            PML's key order; NaN when every query is lone. An :class:`AccuracyResult` (a
            ``dict``) whose ``backend`` attribute names the neighbour search that ran.

        Raises ``ValueError`` for embeddings whose float32 distances would overflow (row norms
        near 1e19 with ``metric="l2"`` or ``"ip"``).
        """
        self._check_names(include, "include")
        self._check_names(exclude, "exclude")
        names = self._select(include, exclude, self.metrics)
        q = as_float_matrix(query, "query")
        yq = as_labels(query_labels, q.shape[0], "query_labels")
        if reference is None:
            if reference_labels is not None:
                raise ValueError("reference_labels was passed without reference; pass both")
            r, yr, ref_includes_query = q, yq, True
        else:
            if reference_labels is None:
                raise ValueError("reference was passed without reference_labels; pass both")
            r = as_float_matrix(reference, "reference")
            check_same_dim(q, r, "query", "reference")
            yr = as_labels(reference_labels, r.shape[0], "reference_labels")
            if ref_includes_query and not (
                r.shape[0] >= q.shape[0]
                and np.allclose(q, r[: q.shape[0]])
                and np.array_equal(yq, yr[: q.shape[0]])
            ):
                raise ValueError(
                    "ref_includes_query=True needs the first len(query) rows of reference (and "
                    "of reference_labels) to be the queries; pass ref_includes_query=False for "
                    "a separate reference set"
                )
        out: dict[str, float | list[float]] = {}
        info: dict[str, str] = {}
        knn_names = tuple(n for n in names if n in KNN_METRICS)
        if knn_names:
            out.update(self._knn_metrics(q, yq, r, yr, bool(ref_includes_query), knn_names, info))
        if any(n in CLUSTERING_METRICS for n in names):
            out.update(self._clustering_metrics(q, yq, names))
        result = AccuracyResult((n, out[n]) for n in METRICS if n in out)
        result.backend = info.get("backend", "none")
        return result

    def _depth(self, max_bin: int, n_ref: int, self_count: int, names: tuple[str, ...]) -> int:
        """PML's ``determine_k``: the K of the module docstring."""
        if self.k == "max_bin_count":
            return max_bin - self_count
        if self.k is None:
            return n_ref - self_count
        if self.k > n_ref - self_count:
            raise ValueError(
                f"k={self.k} but each query has only {n_ref - self_count} reference items to "
                f"rank; use k <= {n_ref - self_count}, k='max_bin_count' or k=None"
            )
        at_r = {"r_precision", "mean_average_precision_at_r"} & set(names)
        if self.k < max_bin and at_r:
            LOGGER.warning(
                "k=%d is less than the largest class (%d), so %s are cut at k; use "
                "k='max_bin_count' for the full R, or 'mean_average_precision' for MAP@k",
                self.k, max_bin, sorted(at_r),
            )
        return self.k

    def _knn_metrics(self, q, yq, r, yr, includes_query: bool, names: tuple[str, ...],
                     info: dict):
        self_count = int(includes_query)
        uniq_q = np.unique(yq)
        r_q = relevance_counts(yq, yr, includes_query)
        max_bin = int((relevance_counts(uniq_q, yr, False)).max())
        depth = self._depth(max_bin, r.shape[0], self_count, names)
        active = np.flatnonzero(r_q > 0)
        if active.size == 0 or depth < 1:
            LOGGER.warning("None of the query labels are in the reference set.")
            nan = float("nan")
            return {n: ([nan] * uniq_q.size if self.return_per_class else nan) for n in names}
        max_r = int(r_q[active].max())
        deep = any(n in _DEEP for n in names)
        width = depth if deep else min(depth, max_r)
        if self.metric == "cosine":
            same = r is q
            q = normalize_rows(q)
            r = q if same else normalize_rows(r)
        q_act = q[active] if active.size < q.shape[0] else q
        yq_act, r_act = yq[active], r_q[active]
        self_index = active if includes_query else None
        if _use_ranks(deep, depth, max_r):
            check_score_range(q_act, r, "l2" if self.metric == "l2" else "ip")
            dev = _resolve_device(self.device)
            info["backend"] = describe_plan(Plan("torch", dev)) + ", full ranking"
            values = self._rank_search(q_act, yq_act, r_act, r, yr, self_index, depth, names)
            return {n: _average(values[n], yq_act, self.avg_of_avgs, self.return_per_class)
                    for n in names}
        values = {n: np.empty(active.size) for n in names}
        labels_dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def block_values(rows: slice, _key: torch.Tensor, idx: torch.Tensor):
            dev = idx.device
            if dev not in labels_dev:  # a benign race in the workers: same tensors either way
                labels_dev[dev] = (torch.from_numpy(yr).to(dev), torch.from_numpy(yq_act).to(dev),
                                   torch.from_numpy(r_act).to(dev))
            yr_t, yq_t, r_t = labels_dev[dev]
            vals = knn_values(yr_t[idx] == yq_t[rows, None], r_t[rows], depth, names)
            for n, v in vals.items():
                values[n][rows] = v.cpu().numpy()
            return None

        for _ in search_blocks(
            q_act, r, width, "l2" if self.metric == "l2" else "ip",
            self_index, self.backend, self.device, self.block_size,
            large_k_blocks=True, reduce=block_values, info=info,
        ):
            pass
        return {n: _average(values[n], yq_act, self.avg_of_avgs, self.return_per_class)
                for n in names}

    def _rank_search(self, q_act, yq_act, r_act, r, yr, self_index, depth, names):
        """Per-query values from :func:`relevant_ranks` over full score rows, in blocks of
        queries of the same or neighbouring labels (little padding of the relevant lists).
        Identical reference rows share one computed score (scored once, as in the search)."""
        dev = _resolve_device(self.device)
        n_ref = r.shape[0]
        dup = find_duplicates(r)
        searched = r if dup is None else np.ascontiguousarray(r[dup.unique_rows])
        ref_t = torch.from_numpy(searched).to(dev)
        metric = "l2" if self.metric == "l2" else "ip"
        r_sq = (ref_t * ref_t).sum(1) if metric == "l2" else None
        group_t = None
        if dup is not None:  # item -> its searched row
            group = np.empty(n_ref, dtype=np.int64)
            group[dup.members] = np.repeat(np.arange(dup.mult.size), dup.mult)
            group_t = torch.from_numpy(group).to(dev)
        by_label = np.argsort(yr, kind="stable")  # each label's items, ascending
        first = np.searchsorted(yr[by_label], yq_act, "left")
        count = np.searchsorted(yr[by_label], yq_act, "right") - first  # self included
        by_label_t = torch.from_numpy(by_label).to(dev)
        budget = _GPU_BLOCK_BYTES if dev.type == "cuda" else _CPU_BLOCK_BYTES
        step = self.block_size or max(1, budget // (n_ref * 32))  # key, packed, pos, ...
        order = np.argsort(yq_act, kind="stable")
        values = {n: np.empty(q_act.shape[0]) for n in names}
        for s in range(0, order.size, step):
            rows = order[s : s + step]
            key = block_keys(torch.from_numpy(q_act[rows]).to(dev), ref_t, r_sq, metric)
            if group_t is not None:
                key = key[:, group_t]
            width = int(count[rows].max())
            at = torch.from_numpy(first[rows]).to(dev)[:, None] + torch.arange(width, device=dev)
            rel_idx = by_label_t[at.clamp_(max=n_ref - 1)]
            self_rows = None if self_index is None else torch.from_numpy(self_index[rows]).to(dev)
            ranks = relevant_ranks(key, rel_idx, torch.from_numpy(count[rows]).to(dev), self_rows)
            vals = rank_values(ranks, torch.from_numpy(r_act[rows]).to(dev), depth, names)
            for n, v in vals.items():
                values[n][rows] = v.cpu().numpy()
        return values

    def _clustering_metrics(self, q, yq, names):
        from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

        n_clusters = int(np.unique(yq).size)
        if self.kmeans_func is not None:
            assign = self.kmeans_func(torch.from_numpy(q), n_clusters)
            assign = as_labels(assign, q.shape[0], "kmeans_func's cluster ids")
        else:
            # PML's default FaissKMeans: plain k-means on the raw rows, whatever the distance
            assign = kmeans_assign(q, n_clusters, seed=KMEANS_SEED, niter=20, metric="l2")
        out = {}
        if "NMI" in names:
            out["NMI"] = float(normalized_mutual_info_score(yq, assign))
        if "AMI" in names:
            out["AMI"] = float(adjusted_mutual_info_score(yq, assign))
        return out
