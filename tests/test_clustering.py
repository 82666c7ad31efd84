"""evaluation.clustering: NMI/AMI of a k-means clustering, against NMI and AMI written here in
numpy/scipy from their definitions (Vinh, Epps & Bailey, JMLR 2010)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from scipy.special import gammaln
from sklearn.metrics import adjusted_mutual_info_score

from evaluation.clustering import clustering_metrics, kmeans_assign

backends_mod = importlib.import_module("evaluation.backends")
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


def numpy_ami(a, b):
    """AMI = (MI - E[MI]) / (mean(H(A), H(B)) - E[MI]), arithmetic mean, natural logs, with
    E[MI] under the permutation (hypergeometric) model summed term by term (Vinh et al. 2010,
    eq. 24a)::

        E[MI] = sum_ij sum_{n=max(1, a_i+b_j-N)}^{min(a_i, b_j)} n/N log(N n / (a_i b_j))
                * a_i! b_j! (N-a_i)! (N-b_j)! / (N! n! (a_i-n)! (b_j-n)! (N-a_i-b_j+n)!)
    """
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    n_total = len(ai)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    ra, rb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] / n_total * np.log(n_total * joint[nz] / np.outer(ra, rb)[nz])).sum()
    ent = lambda c: -(c / n_total * np.log(c / n_total)).sum()
    lf = lambda x: gammaln(x + 1.0)  # log x!
    emi = 0.0
    for x in ra:
        for y in rb:
            for n in range(int(max(1, x + y - n_total)), int(min(x, y)) + 1):
                log_p = (lf(x) + lf(y) + lf(n_total - x) + lf(n_total - y) - lf(n_total)
                         - lf(n) - lf(x - n) - lf(y - n) - lf(n_total - x - y + n))
                emi += n / n_total * np.log(n_total * n / (x * y)) * np.exp(log_p)
    return (mi - emi) / ((ent(ra) + ent(rb)) / 2 - emi)


def test_numpy_ami_reference():
    """The reference itself: 1 for equal partitions (any names), ~0 in expectation for
    independent ones, and the value scikit-learn computes on a few random labellings."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    assert numpy_ami(y, 3 - y) == pytest.approx(1.0, abs=1e-12)
    assert np.mean([numpy_ami(y, rng.integers(0, 3, 60)) for _ in range(200)]) == pytest.approx(
        0.0, abs=0.01)
    for _ in range(3):
        u, v = rng.integers(0, 5, 80), rng.integers(0, 4, 80)
        assert numpy_ami(u, v) == pytest.approx(adjusted_mutual_info_score(u, v), abs=1e-10)


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
    assert out["ami"] == pytest.approx(numpy_ami(y, assign), abs=1e-9)
    assert out["ami"] < out["nmi"]  # chance-corrected: below NMI for an imperfect clustering


def test_deterministic_for_a_seed_and_labels_may_be_any_integers():
    x, y = blobs([40, 60, 25], spread=2.0, seed=4)
    a = clustering_metrics(x, y, seed=5)
    assert clustering_metrics(x, y, seed=5) == a
    assert clustering_metrics(x, y * 7 + 100, seed=5) == a  # NMI is invariant to relabelling


def test_falls_back_to_sklearn_without_faiss(monkeypatch):
    x, y = blobs([30, 30, 30], seed=6)
    monkeypatch.setattr(backends_mod, "_import_faiss", lambda: None)
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


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_cosine_clusters_by_direction_not_norm(backend):
    """Two classes along two directions, norms spread over 0.5..10: cosine k-means recovers the
    classes exactly, and scaling any row changes nothing; Euclidean k-means on the same points
    splits by norm instead (so the data tells the two metrics apart)."""
    rng = np.random.default_rng(8)
    y = np.repeat([0, 1], 60)
    angle = np.where(y == 0, 0.0, np.pi / 2) + rng.normal(0.0, 0.05, y.size)
    norm = rng.uniform(0.5, 10.0, y.size)
    x = np.stack([np.cos(angle), np.sin(angle)], 1) * norm[:, None]
    x = np.concatenate([x, rng.normal(0.0, 0.01, (y.size, 2))], 1).astype(np.float32)
    cos = clustering_metrics(x, y, metric="cosine", backend=backend)
    assert cos["nmi"] == pytest.approx(1.0, abs=1e-9)
    scaled = x * rng.uniform(0.01, 100.0, (y.size, 1)).astype(np.float32)
    assert clustering_metrics(scaled, y, metric="cosine", backend=backend) == cos
    assert clustering_metrics(x, y, metric="l2", backend=backend)["nmi"] < 0.8
