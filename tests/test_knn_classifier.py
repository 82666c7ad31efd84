"""evaluation.weighted_knn: weighted k-NN voting against a brute-force numpy implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.weighted_knn import knn_classifier


def data(n_train, n_test, n_classes, d=10, spread=2.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, d)) * 2.0
    ytr = rng.integers(0, n_classes, n_train)
    yte = rng.integers(0, n_classes, n_test)
    xtr = centers[ytr] + spread * rng.standard_normal((n_train, d))
    xte = centers[yte] + spread * rng.standard_normal((n_test, d))
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


def brute_force(xtr, ytr, xte, yte, k, t, metric):
    """Full float64 similarity, neighbours by (sim desc, index asc), votes exp(sim / t), classes
    ranked by (votes desc, label asc)."""
    a, b = xte.astype(np.float64), xtr.astype(np.float64)
    if metric == "cosine":
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
    sim = -((a[:, None] - b[None]) ** 2).sum(-1) if metric == "l2" else a @ b.T
    classes = np.unique(ytr)
    cols = np.arange(len(b))
    top1 = top5 = 0
    for i in range(len(a)):
        nbr = np.lexsort((cols, -sim[i]))[:k]
        votes = np.zeros(len(classes))
        for j in nbr:
            votes[np.searchsorted(classes, ytr[j])] += np.exp(sim[i, j] / t)
        ranked = classes[np.lexsort((classes, -votes))]
        top1 += ranked[0] == yte[i]
        top5 += yte[i] in ranked[:5]
    return {"top1": top1 / len(a), "top5": top5 / len(a)}


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize(
    ("metric", "k", "t"),
    [("cosine", 200, 0.07), ("cosine", 15, 0.5), ("ip", 20, 10.0), ("l2", 25, 5.0)],
)
def test_matches_brute_force(backend, metric, k, t):
    xtr, ytr, xte, yte = data(400, 150, 12, seed=1)
    ours = knn_classifier(xtr, ytr, xte, yte, k=k, temperature=t, metric=metric, backend=backend)
    ref = brute_force(xtr, ytr, xte, yte, k, t, metric)
    assert ours == pytest.approx(ref, abs=1e-12)
    assert 0.0 < ours["top1"] < ours["top5"] < 1.0


def test_k1_is_nearest_neighbour_accuracy():
    xtr, ytr, xte, yte = data(300, 100, 8, seed=2)
    a = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    b = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    nn_acc = (ytr[(a @ b.T).argmax(1)] == yte).mean()
    assert knn_classifier(xtr, ytr, xte, yte, k=1)["top1"] == pytest.approx(nn_acc)


def test_few_classes_and_unknown_test_labels():
    xtr, ytr, xte, yte = data(200, 80, 3, seed=3)
    out = knn_classifier(xtr, ytr, xte, yte, k=10)
    assert out["top5"] == 1.0  # three classes: all of them are in the top five
    yte_unknown = yte.copy()
    yte_unknown[:20] = 99  # never predicted
    out2 = knn_classifier(xtr, ytr, xte, yte_unknown, k=10)
    assert out2["top5"] == pytest.approx(60 / 80)
    assert out2 == pytest.approx(brute_force(xtr, ytr, xte, yte_unknown, 10, 0.07, "cosine"))


def test_torch_inputs_and_label_offsets():
    xtr, ytr, xte, yte = data(200, 50, 6, seed=4)
    a = knn_classifier(xtr, ytr, xte, yte, k=30)
    b = knn_classifier(torch.from_numpy(xtr), torch.from_numpy(ytr * 3 + 5),
                       torch.from_numpy(xte), torch.from_numpy(yte * 3 + 5), k=30)
    assert a == b


def test_bad_input():
    xtr, ytr, xte, yte = data(50, 20, 4, seed=5)
    with pytest.raises(ValueError, match=r"k=51 is larger than the number of training points"):
        knn_classifier(xtr, ytr, xte, yte, k=51)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn_classifier(xtr, ytr, xte, yte, k=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_classifier(xtr, ytr, xte, yte, k=5, temperature=0.0)
    with pytest.raises(ValueError, match="train_y has 49 entries"):
        knn_classifier(xtr, ytr[:-1], xte, yte, k=5)
    with pytest.raises(ValueError, match="test_y must hold integer class ids"):
        knn_classifier(xtr, ytr, xte, yte + 0.5, k=5)
    with pytest.raises(ValueError, match="dimension"):
        knn_classifier(xtr, ytr, xte[:, :3], yte, k=5)
    with pytest.raises(ValueError, match="test_x is empty"):
        knn_classifier(xtr, ytr, xte[:0], yte[:0], k=5)
