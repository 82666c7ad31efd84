"""evaluation.clustering: NMI/AMI of a k-means clustering, against scikit-learn and a numpy NMI."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score

from evaluation.clustering import clustering_metrics, kmeans_assign

knn_mod = importlib.import_module("evaluation.search")
clustering_mod = importlib.import_module("evaluation.clustering")


def blobs(sizes, d=8, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    y = y[rng.permutation(len(y))]
    centers = rng.standard_normal((len(sizes), d)) * 3.0
    return (centers[y] + spread * rng.standard_normal((len(y), d))).astype(np.float32), y


def numpy_nmi(a, b):
    """I(A;B) / ((H(A) + H(B)) / 2) from the contingency table, natural logs."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum()
    h = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()
    return mi / ((h(pa) + h(pb)) / 2)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_separated_clusters_are_recovered(backend, metric):
    x, y = blobs([30, 50, 20, 40], seed=1)
    out = clustering_metrics(x, y, metric=metric, backend=backend)
    assert out["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert out["ami"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_scores_are_those_of_the_clustering(backend):
    x, y = blobs([40, 60, 25, 35, 40], spread=2.5, seed=2)  # overlapping: an imperfect clustering
    out = clustering_metrics(x, y, seed=3, backend=backend)
    assign = kmeans_assign(x, 5, seed=3, backend=backend)
    assert 0.05 < out["nmi"] < 0.99
    assert out["nmi"] == pytest.approx(numpy_nmi(y, assign), abs=1e-9)
    assert out["ami"] == pytest.approx(adjusted_mutual_info_score(y, assign), abs=1e-12)


def test_deterministic_for_a_seed_and_labels_may_be_any_integers():
    x, y = blobs([40, 60, 25], spread=2.0, seed=4)
    a = clustering_metrics(x, y, seed=5)
    assert clustering_metrics(x, y, seed=5) == a
    assert clustering_metrics(x, y * 7 + 100, seed=5) == a  # NMI is invariant to relabelling


def test_falls_back_to_sklearn_without_faiss(monkeypatch):
    x, y = blobs([30, 30, 30], seed=6)
    monkeypatch.setattr(knn_mod, "_import_faiss", lambda: None)
    monkeypatch.setattr(clustering_mod, "_import_faiss", lambda: None)
    assert clustering_metrics(x, y)["nmi"] == pytest.approx(1.0)
    with pytest.raises(ImportError, match="faiss"):
        kmeans_assign(x, 3, backend="faiss")


def test_bad_input():
    x, y = blobs([10, 10], seed=7)
    with pytest.raises(ValueError, match="metric must be one of"):
        clustering_metrics(x, y, metric="ip")
    with pytest.raises(ValueError, match="labels has 19 entries"):
        clustering_metrics(x, y[:-1])
    with pytest.raises(ValueError, match="labels must hold integer class ids"):
        clustering_metrics(x, y + 0.25)
    with pytest.raises(ValueError, match="n_clusters=21 is larger than the number of embeddings"):
        kmeans_assign(x, 21)
    with pytest.raises(ValueError, match="backend"):
        kmeans_assign(x, 2, backend="torch")
    with pytest.raises(ValueError, match="embeddings has NaN"):
        clustering_metrics(np.where(np.arange(20)[:, None] == 3, np.nan, x), y)
