"""Review of the linear probe, the weighted k-NN classifier and the k-means NMI / AMI against
independent references: scikit-learn (LogisticRegression, MinMaxScaler / StandardScaler fitted on
the training split, KNeighborsClassifier with a custom weight function, KMeans,
normalized_mutual_info_score, adjusted_mutual_info_score) and brute-force numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from evaluation.clustering import clustering_metrics, kmeans_assign
from evaluation.probe import linear_probe, sklearn_C
from evaluation.weighted_knn import knn_classifier

LABELS = np.array([3, 7, 100])  # non-contiguous class ids


def _blobs(
    n: int, d: int = 6, labels: np.ndarray = LABELS, sep: float = 1.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs, one mean per class, float32 features."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(labels.size, d)) * sep
    pick = rng.integers(0, labels.size, n)
    x = means[pick] + rng.normal(size=(n, d))
    return x.astype(np.float32), labels[pick]


def _offset_features(seed: int = 0) -> tuple[np.ndarray, ...]:
    """Two classes told apart only below float32 resolution: ``1e4 + 1e-4 * signal`` in float64
    (float32's spacing at 1e4 is about 1e-3, so a float32 copy holds no signal at all)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], 100)
    sig = rng.normal(size=(200, 2))
    sig[:, 0] += 3.0 * y
    x = 1e4 + 1e-4 * sig  # float64
    return x[::2], y[::2], x[1::2], y[1::2]


# --------------------------------------------------------------------------- linear probe


def test_probe_tschannen2020_scaler_fitted_on_train_and_test_split_scored():
    """MinMaxScaler fitted on train only, then saga C=10 tol=0.1: test features far outside the
    training range, non-contiguous labels and a test class never seen in training."""
    xtr, ytr = _blobs(240, seed=1)
    xte, yte = _blobs(120, seed=2)
    xte = xte * 3.0 + 2.0  # a scaler fitted on test (or on both) would change the result
    yte = yte.copy()
    yte[:15] = 55  # unseen class: always an error
    ours = linear_probe(xtr, ytr, xte, yte, protocol="tschannen2020", seed=0)
    ref = make_pipeline(
        MinMaxScaler(),
        LogisticRegression(solver="saga", C=10.0, tol=0.1, max_iter=1000, random_state=0),
    ).fit(xtr, ytr)
    assert ours["accuracy"] == ref.score(xte, yte)
    assert ours["train_accuracy"] == ref.score(xtr, ytr)
    assert ours["accuracy"] <= 1 - 15 / len(yte)


def test_probe_torch_equals_sklearn_with_noncontiguous_and_unseen_labels():
    xtr, ytr = _blobs(300, seed=3)
    xte, yte = _blobs(150, seed=4)
    yte = yte.copy()
    yte[:10] = -4
    wd = 1e-2
    ours = linear_probe(xtr, ytr, xte, yte, weight_decays=wd, dtype=torch.float64, tol=1e-10)
    ref = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=sklearn_C(wd, len(ytr), LABELS.size), tol=1e-10, max_iter=10000),
    ).fit(xtr, ytr)
    assert abs(ours["accuracy"] - ref.score(xte, yte)) <= 1 / len(yte)
    assert abs(ours["train_accuracy"] - ref.score(xtr, ytr)) <= 1 / len(ytr)


def test_probe_two_samples_per_class_sweeps():
    """Two items per class: the sweep keeps one per class for fitting, one for validation."""
    rng = np.random.default_rng(5)
    ytr = np.array([1, 1, 2, 2, 3, 3])
    xtr = (rng.normal(size=(6, 4)) + 3.0 * np.eye(4)[ytr]).astype(np.float32)
    out = linear_probe(xtr, ytr, xtr, ytr)
    assert 0.0 <= out["accuracy"] <= 1.0 and len(out["val_accuracies"]) > 1


def test_probe_float64_features_are_not_rounded_to_float32_torch():
    """``dtype=torch.float64`` ("for exact parity checks") must see the float64 features."""
    xtr, ytr, xte, yte = _offset_features()
    wd = 1e-3
    ours = linear_probe(xtr, ytr, xte, yte, weight_decays=wd, dtype=torch.float64)
    ref = make_pipeline(
        StandardScaler(), LogisticRegression(C=sklearn_C(wd, len(ytr), 2), tol=1e-8)
    ).fit(xtr, ytr)
    assert ref.score(xte, yte) > 0.85  # the signal is there in float64
    assert abs(ours["accuracy"] - ref.score(xte, yte)) <= 1 / len(yte)


def test_probe_float64_features_are_not_rounded_to_float32_tschannen2020():
    """The paper's protocol "unchanged" is the scikit-learn pipeline on the features as given
    (the paper's noisy pixels are float64)."""
    xtr, ytr, xte, yte = _offset_features()
    ours = linear_probe(xtr, ytr, xte, yte, protocol="tschannen2020", seed=0)
    ref = make_pipeline(
        MinMaxScaler(),
        LogisticRegression(solver="saga", C=10.0, tol=0.1, max_iter=1000, random_state=0),
    ).fit(xtr, ytr)
    assert ref.score(xte, yte) > 0.85
    assert ours["accuracy"] == ref.score(xte, yte)


@pytest.mark.parametrize("protocol", ["torch", "tschannen2020"])
@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_probe_bad_seed_names_seed(protocol, seed):
    xtr, ytr = _blobs(60, seed=6)
    with pytest.raises(ValueError, match="seed"):
        linear_probe(xtr, ytr, xtr, ytr, protocol=protocol, seed=seed)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_decays": np.float32(1e-2)},
        {"weight_decays": np.int64(0)},
        {"weight_decays": np.array(1e-2)},
        {"weight_decays": 1e-2, "tol": np.float32(1e-6)},
        {"weight_decays": 1e-2, "max_iter": np.int64(500)},
    ],
)
def test_probe_numpy_scalars_are_numbers(kwargs):
    """A numpy scalar is the same setting as the Python number (as ``k`` and ``niter`` are)."""
    xtr, ytr = _blobs(90, seed=15)
    xte, yte = _blobs(45, seed=16)
    plain = {key: v.item() for key, v in kwargs.items() if isinstance(v, np.generic | np.ndarray)}
    expected = linear_probe(xtr, ytr, xte, yte, **{**kwargs, **plain})
    got = linear_probe(xtr, ytr, xte, yte, **kwargs)
    assert got["accuracy"] == expected["accuracy"]
    assert got["weight_decay"] == expected["weight_decay"]


# --------------------------------------------------------------------------- weighted k-NN


def _cos_weight(temperature: float):
    """sklearn's cosine distance is ``1 - s``: ``exp(s / T) = exp((1 - d) / T)``."""
    return lambda d: np.exp((1.0 - d) / temperature)


def test_knn_top1_equals_sklearn_custom_weights():
    xtr, ytr = _blobs(300, d=5, sep=0.8, seed=7)
    xte, yte = _blobs(120, d=5, sep=0.8, seed=8)
    yte = yte.copy()
    yte[:7] = 999  # never predicted
    k, t = 25, 0.07
    ref = KNeighborsClassifier(
        n_neighbors=k, weights=_cos_weight(t), metric="cosine", algorithm="brute"
    ).fit(xtr.astype(np.float64), ytr)
    expected = float(np.mean(ref.predict(xte.astype(np.float64)) == yte))
    for backend in ("torch", "faiss", "blocks"):
        got = knn_classifier(xtr, ytr, xte, yte, k=k, temperature=t, backend=backend)
        assert got["top1"] == pytest.approx(expected, abs=1e-12), backend


def _brute_knn(xtr, ytr, xte, yte, k, t):
    """Inner-product scores, neighbours by (score desc, index asc), classes by (score desc,
    label asc), every training class ranked."""
    s = xte.astype(np.float64) @ xtr.astype(np.float64).T
    classes = np.unique(ytr)
    top1 = top5 = 0
    for i in range(len(xte)):
        nbrs = sorted(range(len(xtr)), key=lambda j: (-s[i, j], j))[:k]
        score = dict.fromkeys(classes.tolist(), 0.0)
        for j in nbrs:
            score[int(ytr[j])] += np.exp(s[i, j] / t)
        rank = sorted(score, key=lambda c: (-score[c], c))
        top1 += rank[0] == yte[i]
        top5 += yte[i] in rank[:5]
    return top1 / len(xte), top5 / len(xte)


@pytest.mark.parametrize("k", [1, 4, 9, 30])
def test_knn_ties_equal_brute_force(k):
    """Integer grid points: many equal scores at the k-th place and equal class scores."""
    rng = np.random.default_rng(9)
    xtr = rng.integers(-1, 2, size=(30, 2)).astype(np.float32)
    ytr = rng.choice([10, 20, 30, 40, 50, 60, 70], 30)
    xte = rng.integers(-1, 2, size=(25, 2)).astype(np.float32)
    yte = rng.choice([10, 20, 30, 40, 50, 60, 70, 80], 25)
    ref = _brute_knn(xtr, ytr, xte, yte, k, 1.0)
    for backend in ("torch", "faiss", "blocks"):
        got = knn_classifier(xtr, ytr, xte, yte, k=k, temperature=1.0, metric="ip",
                             backend=backend)
        assert (got["top1"], got["top5"]) == pytest.approx(ref, abs=1e-12), backend


def test_knn_k_larger_than_train_names_k_and_the_fix():
    xtr, ytr = _blobs(20, seed=10)
    with pytest.raises(ValueError, match=r"k=200 .*20.*k <= 20"):
        knn_classifier(xtr, ytr, xtr, ytr)


def test_knn_one_class_and_float64_torch_inputs():
    xtr, _ = _blobs(12, seed=11)
    got = knn_classifier(torch.from_numpy(xtr).double(), torch.full((12,), 4),
                         xtr[:5], np.full(5, 4), k=3)
    assert got == {"top1": 1.0, "top5": 1.0}


# --------------------------------------------------------------------------- clustering


def test_clustering_sklearn_backend_equals_direct_kmeans():
    x, y = _blobs(200, d=4, sep=2.0, seed=12)
    assign = KMeans(n_clusters=3, n_init=1, max_iter=20, random_state=5).fit_predict(x)
    got = clustering_metrics(x, y, seed=5, metric="l2", backend="sklearn")
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(y, assign), abs=1e-12)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_clustering_scores_its_own_assignment_and_is_reproducible(backend):
    x, y = _blobs(150, d=4, sep=1.0, seed=13)
    assign = kmeans_assign(x, 3, seed=2, backend=backend)
    np.testing.assert_array_equal(assign, kmeans_assign(x, 3, seed=2, backend=backend))
    got = clustering_metrics(x, y, seed=2, backend=backend)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(y, assign), abs=1e-12)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
@pytest.mark.parametrize("seed", [None, -1, 2**31, 1.5])
def test_clustering_bad_seed_names_seed(backend, seed):
    """The same seeds work with both backends (FAISS's seed is a C int, scikit-learn's a
    non-negative one); anything else is an error naming ``seed``, not a silent truncation."""
    x, y = _blobs(30, seed=14)
    with pytest.raises(ValueError, match="seed"):
        clustering_metrics(x, y, seed=seed, backend=backend)
