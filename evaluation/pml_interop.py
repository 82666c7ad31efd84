"""pytorch-metric-learning interop: our k-NN backends as PML's ``knn_func``, and back.

PML's ``AccuracyCalculator(knn_func=...)`` calls ``knn_func(query, k, reference,
ref_includes_query)`` and expects ``(distances [Nq, k], indices [Nq, k])`` on the query's device,
where ``ref_includes_query=True`` means query row ``i`` is reference row ``i`` and is left out of
its own neighbours (as ``pytorch_metric_learning.utils.inference.FaissKNN`` and ``CustomKNN`` do).

* :class:`KnnFunc` -- our exact search (any backend name or
  :class:`~evaluation.backends.KnnBackend`, with the tie repair of :mod:`evaluation.ties`) in
  that shape: squared L2 distances ascending for ``metric="l2"`` (what ``FaissKNN()`` returns),
  similarities descending for "cosine" / "ip" (what ``CustomKNN(CosineSimilarity())`` /
  ``CustomKNN(DotProductSimilarity())`` return).
* :class:`PmlBackend` -- a PML ``knn_func`` as a :class:`~evaluation.backends.KnnBackend`, so
  :func:`evaluation.knn` and :func:`evaluation.retrieval_metrics` can search with it (``metric``
  says what its distances are: "l2" for ``FaissKNN()``, "ip" for a similarity).

PML is not imported here: both classes only follow its calling convention.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ._inputs import check_k, check_metric, query_and_reference
from .backends import KnnBackend

__all__ = ["KnnFunc", "PmlBackend"]


class KnnFunc:
    """Our exact k-NN search as a PML ``knn_func``.

    Args:
        metric: "cosine" | "ip" | "l2" (squared distances), as in :func:`evaluation.knn`.
        backend: "auto" | "faiss" | "torch" or a :class:`~evaluation.backends.KnnBackend`.
        device: where to search (default: the query's device).
    """

    def __init__(self, metric: str = "l2", backend: str | KnnBackend = "auto",
                 device: object = None) -> None:
        self.metric = check_metric(metric)
        self.backend = backend
        self.device = device

    def __call__(self, query: Tensor, k: int, reference: Tensor | None = None,
                 ref_includes_query: bool = False) -> tuple[Tensor, Tensor]:
        """``(distances or similarities [Nq, k], indices [Nq, k])`` on ``query``'s device.

        Inputs are checked as everywhere in :mod:`evaluation` (finite 2-D embeddings of one
        dimension, ``1 <= k <=`` the candidates per query); a ``ValueError`` names the argument.
        """
        from .search import search_all  # lazy: evaluation.search is the layer above

        out_dev = query.device if isinstance(query, Tensor) else torch.device("cpu")
        q, r = query_and_reference(query, reference)
        if ref_includes_query and r.shape[0] < q.shape[0]:
            raise ValueError(
                f"ref_includes_query=True needs the queries to be the first rows of reference, "
                f"but reference has {r.shape[0]} rows and query {q.shape[0]}"
            )
        avail = r.shape[0] - int(bool(ref_includes_query))
        k = check_k(k, "k", upper=avail, upper_what="the number of reference rows"
                    + (" other than the query itself" if ref_includes_query else ""))
        self_index = np.arange(q.shape[0], dtype=np.int64) if ref_includes_query else None
        device = self.device if self.device is not None else out_dev
        scores, indices = search_all(q, r, k, self.metric, self_index, self.backend, device)
        return torch.from_numpy(scores).to(out_dev), torch.from_numpy(indices).to(out_dev)


class PmlBackend:
    """A PML ``knn_func`` (e.g. ``FaissKNN()``, ``CustomKNN(CosineSimilarity())``) as a
    :class:`~evaluation.backends.KnnBackend`: ``search(q, r, k)`` calls ``knn_func(q, k, r,
    False)``. ``metric``: "l2" when it returns squared distances (ascending), "ip" when it
    returns similarities (descending). For an exact, index-ordered search pass it to
    :func:`evaluation.knn` (``backend=PmlBackend(...)``) or wrap it in
    :class:`evaluation.ties.ExactTies`."""

    def __init__(self, knn_func: Callable, metric: str = "l2") -> None:
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2' (what knn_func returns), got {metric!r}")
        self.knn_func = knn_func
        self.metric = metric
        self.name = f"pml {type(knn_func).__name__}"

    def search(self, query: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]:
        dist, idx = self.knn_func(query, k, reference, False)
        dist = torch.as_tensor(dist, dtype=torch.float32)
        return dist.to(query.device), torch.as_tensor(idx).long().to(query.device)
