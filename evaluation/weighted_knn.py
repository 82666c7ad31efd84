"""Weighted k-NN classification on frozen embeddings (Wu, Xiong, Yu, Lin, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", CVPR 2018; the protocol of InstDisc, MoCo
and DINO's k-NN evaluation).

For a test point with neighbours ``N_k`` (its k nearest training points by similarity ``s``),
each neighbour votes for its class with weight ``exp(s / T)``:

    score(c) = sum_{j in N_k, y_j = c} exp(s_j / T),

and the classes are ranked by score. ``s`` is the cosine similarity (default), the inner product,
or minus the squared Euclidean distance for ``metric="l2"``. Classes are ranked by
``log score(c)``, a log-sum-exp per class taken from that class's own largest ``s_j / T``, so
it neither overflows nor underflows: a class with a vote always ranks above every class without
one (``-inf``), however small ``exp(s / T)`` is next to the nearest neighbour's (e.g.
``metric="l2"`` with squared distances 100 apart at T = 0.07). Ties between classes (including
the classes with no votes, when fewer than five classes appear among the neighbours) are broken
by the lower class label. Top-1 / top-5 accuracy: the true class is first / among the first five.
"""

from __future__ import annotations

import numpy as np
import torch

from contrastive.validation import check_temperature

from ._inputs import as_float_matrix, as_labels, check_k, check_metric, check_same_dim
from .backends import KnnBackend, normalize_rows
from .search import SearchedMetrics, search_blocks

__all__ = ["knn_classifier", "vote", "KnnClassifierResult"]


class KnnClassifierResult(SearchedMetrics):
    """``{"top1", "top5"}`` (a plain ``dict`` of numbers) plus the attribute ``backend``: the
    name of the search that found the neighbours (e.g. ``"faiss-cpu IndexFlat exact"``)."""


def vote(key: torch.Tensor, nbr_class: torch.Tensor, n_classes: int,
         temperature: float) -> torch.Tensor:
    """Log class scores ``[B, C]`` (float64), ``log sum_{j: y_j = c} exp(s_j / T)``, from
    neighbour keys ``[B, k]`` (``s``) and their class ids; ``-inf`` for a class without a vote.

    Each class's sum is taken relative to its own largest term (which contributes exactly 1),
    so no class with a vote underflows to the score of a class without one.
    """
    z = key.double() / temperature
    b = key.shape[0]
    top = torch.full((b, n_classes), -torch.inf, dtype=torch.float64, device=key.device)
    top.scatter_reduce_(1, nbr_class, z, reduce="amax", include_self=True)
    w = torch.exp(z - top.gather(1, nbr_class))
    sums = torch.zeros(b, n_classes, dtype=torch.float64, device=key.device)
    sums.scatter_add_(1, nbr_class, w)
    return top + sums.log()  # no vote: -inf + log(0) = -inf


def knn_classifier(
    train_x: object,
    train_y: object,
    test_x: object,
    test_y: object,
    k: int = 200,
    temperature: float = 0.07,
    metric: str = "cosine",
    backend: str | KnnBackend = "auto",
    device: object = None,
    block_size: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of weighted k-NN voting.

    Args:
        train_x, train_y: ``[N, d]`` training embeddings and integer labels (the memory bank).
        test_x, test_y: ``[M, d]`` test embeddings and labels; a test label absent from the
            training set is never predicted (counts as a miss).
        k: neighbours per test point, ``1 <= k <= N`` (200 by convention).
        temperature: T in ``exp(s / T)`` (0.07 by convention), > 0.
        metric: "cosine" | "ip" | "l2".
        backend, device, block_size, progress: passed to the k-NN search.

    Returns:
        ``{"top1", "top5"}``, a :class:`KnnClassifierResult` (a ``dict``) whose ``backend``
        attribute names the search that ran. ``ValueError`` for embeddings whose float32
        scores would overflow (row norms near 1e19 with ``metric="l2"`` or ``"ip"``).
    """
    metric = check_metric(metric)
    xtr = as_float_matrix(train_x, "train_x")
    ytr = as_labels(train_y, xtr.shape[0], "train_y")
    xte = as_float_matrix(test_x, "test_x")
    yte = as_labels(test_y, xte.shape[0], "test_y")
    check_same_dim(xtr, xte, "train_x", "test_x")
    k = check_k(k, "k", upper=xtr.shape[0], upper_what="the number of training points (train_x)")
    t = check_temperature(temperature)

    classes, ytr_id = np.unique(ytr, return_inverse=True)
    n_cls = classes.size
    pos = np.minimum(np.searchsorted(classes, yte), n_cls - 1)
    yte_id = np.where(classes[pos] == yte, pos, -1)
    if metric == "cosine":
        xtr, xte = normalize_rows(xtr), normalize_rows(xte)

    top1 = top5 = 0
    ytr_dev: dict[torch.device, torch.Tensor] = {}
    info: dict[str, str] = {}
    for rows, key, idx in search_blocks(
        xte, xtr, k, "l2" if metric == "l2" else "ip", None, backend, device, block_size, progress,
        info=info,
    ):
        dev = idx.device
        if dev not in ytr_dev:
            ytr_dev[dev] = torch.from_numpy(ytr_id.astype(np.int64)).to(dev)
        truth = torch.from_numpy(yte_id[rows]).to(dev)
        step = max(1, (1 << 23) // max(n_cls, 1))  # vote's two [step, C] float64: ~128 MiB
        for s in range(0, key.shape[0], step):
            scores = vote(key[s : s + step], ytr_dev[dev][idx[s : s + step]], n_cls, t)
            # rank classes by (score desc, class asc): stable sort keeps ascending class order
            order = scores.sort(dim=1, descending=True, stable=True).indices[:, :5]
            hit = order == truth[s : s + step, None]
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(dim=1).sum())
    m = xte.shape[0]
    out = KnnClassifierResult(top1=top1 / m, top5=top5 / m)
    out.backend = info.get("backend", "none")
    return out
