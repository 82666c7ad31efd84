"""Clustering quality of embeddings: k-means, scored by NMI and AMI against the labels.

k-means (Lloyd, with FAISS's ``faiss.Kmeans``; scikit-learn's ``KMeans`` when FAISS is not
importable) with as many clusters as there are labels, then

* NMI = I(Y; C) / mean(H(Y), H(C)) (arithmetic mean; Strehl & Ghosh 2002), and
* AMI = (I - E[I]) / (mean(H(Y), H(C)) - E[I]) (Vinh, Epps & Bailey 2010),

computed by scikit-learn's ``normalized_mutual_info_score`` / ``adjusted_mutual_info_score``.
This is the NMI protocol of deep metric learning (e.g. Song et al. 2016, Musgrave et al. 2020).
With ``metric="cosine"`` rows are L2-normalised and k-means is spherical (centroids
renormalised each step with FAISS; plain k-means on the normalised rows with scikit-learn).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from contrastive.validation import check_int

from ._inputs import as_float_matrix, as_labels, check_k, check_metric
from .backends import _import_faiss, normalize_rows

__all__ = ["kmeans_assign", "clustering_metrics"]

SEED_MAX = 2**31 - 1  # FAISS's ClusteringParameters.seed is a C int


def _check_seed(seed: object) -> int:
    """``seed`` if it is an integer in ``[0, 2**31 - 1]``: the seeds both backends take (FAISS's
    is a C ``int``, scikit-learn's ``random_state`` a non-negative one), so no backend truncates
    a float or wraps a negative seed while the other refuses it."""
    return check_int(seed, "seed", 0, SEED_MAX, why=" (e.g. seed=0)")


def kmeans_assign(
    embeddings: object,
    n_clusters: int,
    seed: int = 0,
    metric: str = "cosine",
    niter: int = 20,
    backend: str = "auto",
) -> np.ndarray:
    """Cluster ids ``[N]`` (int64) from k-means with ``n_clusters`` centroids.

    ``metric``: "cosine" (the default) L2-normalises the rows and runs spherical k-means
    (FAISS; plain k-means on the normalised rows with scikit-learn); "l2" runs plain k-means on
    the rows as given (what :class:`evaluation.AccuracyCalculator` uses, as PML does).
    ``backend``: "auto" (FAISS if importable, else scikit-learn), "faiss" or "sklearn".
    Deterministic for a given ``seed`` (an integer in ``[0, 2**31 - 1]``) and backend.
    """
    seed = _check_seed(seed)
    metric = check_metric(metric, ("cosine", "l2"))
    x = as_float_matrix(embeddings, "embeddings")
    n_clusters = check_k(n_clusters, "n_clusters", upper=x.shape[0],
                         upper_what="the number of embeddings")
    niter = check_k(niter, "niter")
    if backend not in ("auto", "faiss", "sklearn"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'sklearn', got {backend!r}")
    if metric == "cosine":
        x = normalize_rows(x)
    faiss = _import_faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' but faiss is not importable; use backend='sklearn'")
    if faiss is not None:
        km = faiss.Kmeans(
            x.shape[1],
            n_clusters,
            niter=niter,
            seed=seed,
            spherical=metric == "cosine",
            min_points_per_centroid=1,  # silence the "too few points" warning
            verbose=False,
        )
        km.train(x)
        _, assign = km.index.search(x, 1)
        return assign[:, 0].astype(np.int64)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=niter, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def clustering_metrics(
    embeddings: object,
    labels: object,
    seed: int = 0,
    metric: str = "cosine",
    niter: int = 20,
    backend: str = "auto",
) -> dict[str, float]:
    """``{"nmi", "ami"}`` of a k-means clustering (one cluster per label) against ``labels``.

    With the default ``metric="cosine"`` the k-means is spherical on L2-normalised rows (see
    :func:`kmeans_assign`); this is the NMI of ``evaluate_embedder`` and of the ``compare``
    tables. It differs from :class:`evaluation.AccuracyCalculator`'s ``NMI`` / ``AMI``, which
    follow PML and cluster the raw embeddings (``metric="l2"`` here) whatever their distance.
    """
    seed = _check_seed(seed)
    x = as_float_matrix(embeddings, "embeddings")
    y = as_labels(labels, x.shape[0], "labels")
    n_clusters = int(np.unique(y).size)
    assign = kmeans_assign(x, n_clusters, seed=seed, metric=metric, niter=niter, backend=backend)
    return {
        "nmi": float(normalized_mutual_info_score(y, assign)),
        "ami": float(adjusted_mutual_info_score(y, assign)),
    }
