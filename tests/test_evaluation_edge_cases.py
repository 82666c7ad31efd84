"""Edge cases of the evaluation package, checked against references (pytorch-metric-learning's
AccuracyCalculator, a numpy brute force, FAISS's own limits).

* Randomly drawn small configurations (every ``k`` / averaging option, all three ways of passing
  the reference set, exact ties and duplicates) against PML, and ``retrieval_metrics`` against a
  float64 brute force over every backend; label dtypes.
* Regressions of bugs found in review: ``AccuracyCalculator``'s cosine NMI/AMI (raw-embedding
  k-means as PML, while ``clustering_metrics`` keeps its spherical k-means), the weighted k-NN
  classifier's class ranking when vote weights underflow, IVF-PQ options whose training sample
  is smaller than ``2**pq_bits``, ``KnnFunc``'s input checks, ``index=`` / ``index_options``
  with a backend object, and ``AccuracyCalculator(backend=...)``'s check.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PMLCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from evaluation import AccuracyCalculator, KnnFunc, knn, knn_classifier, retrieval_metrics
from evaluation.accuracy_calculator import KNN_METRICS
from evaluation.backends import TorchBackend
from evaluation.clustering import clustering_metrics
from evaluation.weighted_knn import vote

logging.getLogger("PML").setLevel(logging.ERROR)
CPU = torch.device("cpu")


def _pml(args, **options):
    tensors = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
    return PMLCalculator(include=KNN_METRICS, device=CPU, **options).get_accuracy(*tensors)


def _close(ours, theirs, tol=1e-6):
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        np.testing.assert_allclose(np.asarray(ours[name], float), np.asarray(value, float),
                                   rtol=0, atol=tol, err_msg=name)


def _random_case(rng):
    """A small random problem: exact ties (vectors in {-1, 0, 1}^d) or float data, few classes
    (lone queries, classes missing from the reference), one of the three reference layouts."""
    nq, n_cls, d = int(rng.integers(2, 40)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
    discrete = rng.random() < 0.6

    def draw(n):
        x = (rng.integers(-1, 2, size=(n, d)) if discrete else rng.standard_normal((n, d)))
        return x.astype(np.float32), rng.integers(0, n_cls, n)

    xq, yq = draw(nq)
    layout = int(rng.integers(0, 3))
    if layout == 0:
        return (xq, yq), nq - 1
    if layout == 1:
        xr, yr = draw(int(rng.integers(1, 40)))
        return (xq, yq, xr, yr, False), len(yr)
    xe, ye = draw(int(rng.integers(0, 20)))
    return (xq, yq, np.concatenate([xq, xe]), np.concatenate([yq, ye]), True), nq + len(ye) - 1


@pytest.mark.parametrize("seed", range(4))
def test_random_small_problems_equal_pml(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(15):
        args, n_cand = _random_case(rng)
        options = [{}, {"k": "max_bin_count"}, {"k": int(rng.integers(1, n_cand + 1))},
                   {"avg_of_avgs": True}, {"return_per_class": True, "k": "max_bin_count"}][
            int(rng.integers(0, 5))]
        if n_cand < 1 and "k" in options and options["k"] != "max_bin_count":
            continue
        ours = AccuracyCalculator(include=KNN_METRICS, device="cpu", **options)
        _close(ours.get_accuracy(*args), _pml(args, **options))


def _brute_force(q, yq, r, yr, same, ks, metric):
    q, r = q.astype(np.float64), r.astype(np.float64)
    if metric == "l2":
        dist = ((q[:, None] - r[None]) ** 2).sum(-1)
    else:
        if metric == "cosine":
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
            r = r / np.linalg.norm(r, axis=1, keepdims=True)
        dist = -(q @ r.T)
    vals = {"precision_at_1": [], "r_precision": [], "map_at_r": []}
    vals.update({f"recall_at_{k}": [] for k in ks})
    lone = 0
    for i in range(len(q)):
        idx = np.arange(len(r))
        if same:
            idx = idx[idx != i]
        order = idx[np.lexsort((idx, dist[i, idx]))]  # distance, then lower index
        rel = yr[order] == yq[i]
        n_rel = int(rel.sum())
        if n_rel == 0:
            lone += 1
            continue
        hits = rel[:n_rel]
        vals["precision_at_1"].append(rel[0])
        vals["r_precision"].append(hits.mean())
        vals["map_at_r"].append((np.cumsum(hits) / np.arange(1, n_rel + 1) * hits).sum() / n_rel)
        for k in ks:
            vals[f"recall_at_{k}"].append(rel[:k].any())
    out = {name: float(np.mean(v)) if v else float("nan") for name, v in vals.items()}
    out["num_lone_queries"] = lone
    return out


@pytest.mark.parametrize("backend", ["auto", "faiss", "torch", "blocks"])
def test_random_small_problems_equal_brute_force(backend):
    """l2 / ip on exact-tie data, cosine on float data (no ties in exact arithmetic)."""
    rng = np.random.default_rng(7)
    for _ in range(12):
        args, n_cand = _random_case(rng)
        if n_cand < 1:
            continue
        metric = ["l2", "ip", "cosine"][int(rng.integers(0, 3))]
        if metric == "cosine":
            args = tuple(a + np.float32(3.0) * rng.standard_normal((len(a), a.shape[1]))
                         .astype(np.float32) if a.ndim == 2 else a for a in args[:4]) + args[4:]
            if len(args) == 5 and args[4]:  # keep the queries as the first reference rows
                args = (args[0], args[1], np.concatenate([args[0], args[2][len(args[0]):]]),
                        args[3], True)
        same = len(args) == 2
        ks = sorted({int(k) for k in rng.integers(1, n_cand + 1, 2)})
        q, yq = args[0], args[1]
        r, yr = (q, yq) if same else (args[2], args[3])
        ours = retrieval_metrics(q, yq, None if same else r, None if same else yr, ks=ks,
                                 metric=metric, backend=backend, device="cpu")
        ref = _brute_force(q, yq, r, yr, same, ks, metric)
        for name, value in ref.items():
            np.testing.assert_allclose(ours[name], value, rtol=0, atol=1e-9, err_msg=name)
        assert ours.backend != "none" or ref["num_lone_queries"] == len(q)


def test_label_dtypes_give_the_same_values_as_pml():
    rng = np.random.default_rng(3)
    x = rng.integers(-1, 2, size=(60, 3)).astype(np.float32)
    y = rng.integers(0, 5, 60)
    theirs = _pml((x, y), k="max_bin_count")
    for labels in (y.astype(np.int32), y.astype(np.uint8), y.astype(np.float64),
                   torch.from_numpy(y).int(), torch.from_numpy(y)):
        ours = AccuracyCalculator(include=KNN_METRICS, k="max_bin_count").get_accuracy(x, labels)
        _close(ours, theirs)
        rm = retrieval_metrics(x, labels, metric="l2", ks=(1,))
        assert rm["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
        assert rm["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-9)


# ------------------------------------------------------------------------------------------
# regressions of review findings


def test_ivfpq_small_nlist_is_a_clear_error():
    """IVF-PQ trains 2**pq_bits centroids per sub-quantiser on train_size = 64 * nlist rows:
    nlist=3 gives 192 < 256, which FAISS reports only as an opaque RuntimeError."""
    x = np.random.default_rng(0).standard_normal((10_000, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="train_size|pq_bits|nlist") as err:
        knn(x[:5], x, 5, index="ivfpq", index_options={"nlist": 3})
    msg = str(err.value)
    assert "train_size=192" in msg and "2**pq_bits = 256" in msg
    assert "train_size >= 256" in msg and "nlist >= 4" in msg and "pq_bits <= 7" in msg
    with pytest.raises(ValueError, match=r"train_size=255 .*pq_bits <= 7"):
        knn(x[:5], x, 5, index="ivfpq", index_options={"nlist": 3, "train_size": 255})
    with pytest.raises(ValueError, match=r"2\*\*pq_bits = 512 .*pq_bits <= 8"):  # n = 300
        knn(x[:5], x[:300], 5, index="ivfpq", index_options={"pq_bits": 9})


@pytest.mark.parametrize("options", [{"nlist": 3, "train_size": 256}, {"nlist": 4},
                                     {"nlist": 3, "pq_bits": 7}])
def test_ivfpq_suggested_fixes_run(options):
    x = np.random.default_rng(0).standard_normal((2_000, 8)).astype(np.float32)
    scores, idx = knn(x[:5], x, 5, index="ivfpq", index_options=options)
    assert idx.shape == (5, 5) and (idx >= 0).all() and np.isfinite(scores).all()


def test_knn_classifier_top5_survives_weight_underflow():
    # class 7 at distance 0, class 8 at squared distance 100; eight other classes far away
    xtr = np.array([[0.0], [10.0], *[[100.0 + i] for i in range(8)]], dtype=np.float32)
    ytr = np.array([7, 8, 0, 1, 2, 3, 4, 5, 6, 9])
    xte, yte = np.zeros((1, 1), dtype=np.float32), np.array([8])
    t = 0.07
    # reference: class scores in log space, log(sum_j exp(s_j / T)), s = -|x - x_j|^2
    s = -((xte[0, 0] - xtr[:2, 0].astype(np.float64)) ** 2)
    log_score = {7: s[0] / t, 8: s[1] / t}  # the two voting classes; the rest -inf
    ranked = sorted(log_score, key=lambda c: -log_score[c]) + [c for c in range(10)
                                                               if c not in log_score]
    assert ranked[:2] == [7, 8]  # class 8 is second: a top-5 hit
    out = knn_classifier(xtr, ytr, xte, yte, k=2, temperature=t, metric="l2")
    assert out == {"top1": 0.0, "top5": 1.0}


def test_vote_is_a_per_class_log_sum_exp():
    """Log class scores: -inf without a vote, finite with one however far below the best, and
    the old relative weights (exp((s - max s) / T), summed per class) where nothing underflows."""
    rng = np.random.default_rng(5)
    key = torch.from_numpy(rng.standard_normal((6, 9)))
    cls = torch.from_numpy(rng.integers(0, 5, (6, 9)))
    cls[:, 0] = 0  # class 6 never votes
    t = 0.3
    got = vote(key.float(), cls, 7, t)
    z = key.float().double() / t
    ref = np.full((6, 7), -np.inf)
    for b in range(6):
        for c in range(7):
            sel = z[b][cls[b] == c].numpy()
            if sel.size:
                ref[b, c] = np.logaddexp.reduce(sel)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    old = torch.zeros(6, 7, dtype=torch.float64).scatter_add_(
        1, cls, torch.exp(z - z.max(dim=1, keepdim=True).values))
    np.testing.assert_allclose(torch.exp(got - z.max(dim=1, keepdim=True).values).numpy(),
                               old.numpy(), rtol=1e-12, atol=0)
    far = vote(torch.tensor([[0.0, -1e4]]), torch.tensor([[1, 2]]), 4, 0.07)
    assert torch.isfinite(far[0, 1:3]).all() and far[0, 1] > far[0, 2]
    assert far[0, 0] == -torch.inf and far[0, 3] == -torch.inf


def _cosine_case():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 300)
    x = (rng.standard_normal((6, 8))[y] + 1.5 * rng.standard_normal((300, 8))).astype(np.float32)
    x *= rng.uniform(0.2, 5.0, (300, 1)).astype(np.float32)
    return x, y


def test_cosine_nmi_ami_equal_pml():
    x, y = _cosine_case()
    ours = AccuracyCalculator(include=("NMI", "AMI"), metric="cosine").get_accuracy(x, y)
    theirs = PMLCalculator(include=("NMI", "AMI"), knn_func=CustomKNN(CosineSimilarity()),
                           device=CPU).get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    _close(ours, theirs, tol=1e-9)


def test_clustering_metrics_keeps_spherical_kmeans_for_cosine():
    """The published NMI (evaluate_embedder, the compare tables) comes from clustering_metrics,
    whose default cosine k-means stays spherical on normalised rows: the AccuracyCalculator
    fix above must not move it."""
    faiss = pytest.importorskip("faiss")
    from sklearn.metrics import normalized_mutual_info_score

    x, y = _cosine_case()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    km = faiss.Kmeans(8, 6, niter=20, seed=0, spherical=True, min_points_per_centroid=1,
                      verbose=False)
    km.train(xn)
    spherical = km.index.search(xn, 1)[1][:, 0]
    got = clustering_metrics(x, y, seed=0)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y, spherical), abs=1e-12)
    raw = AccuracyCalculator(include=("NMI",), metric="cosine").get_accuracy(x, y)["NMI"]
    assert raw != pytest.approx(got["nmi"], abs=1e-6)  # two protocols, two numbers here


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_knn_func_rejects_nan(backend):
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        KnnFunc(backend=backend)(torch.from_numpy(x), 3, None, True)
    ref = torch.from_numpy(np.nan_to_num(x))
    ref[7, 0] = torch.inf
    with pytest.raises(ValueError, match="reference has NaN or Inf"):
        KnnFunc(backend=backend)(torch.from_numpy(np.nan_to_num(x)), 3, ref, False)


def test_knn_func_k_too_large_names_k():
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="k="):
        KnnFunc()(x, 10, None, True)
    with pytest.raises(ValueError, match="k=11"):
        KnnFunc()(x, 11, x[:3] * 2, False)
    with pytest.raises(ValueError, match="dimension"):
        KnnFunc()(x, 2, x[:, :3], False)
    dist, idx = KnnFunc()(x, 9, None, True)  # the largest k still works
    assert idx.shape == (10, 9) and not (idx == torch.arange(10)[:, None]).any()


def test_backend_object_with_approximate_index_is_an_error():
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    y = np.arange(300) % 10
    with pytest.raises(ValueError, match="index"):
        retrieval_metrics(x, y, backend=TorchBackend("ip"), index="ivf",
                          index_options={"bogus": 1})
    with pytest.raises(ValueError, match="index_options"):
        knn(x, x, 3, metric="ip", backend=TorchBackend("ip"), index="exact",
            index_options={"nprobe": 4})
    # exact (or "auto", which is exact for a backend object) is the object's own search
    a = retrieval_metrics(x, y, backend=TorchBackend("ip"), index="auto")
    b = retrieval_metrics(x, y, backend="torch", index="exact")
    assert a == b


def test_accuracy_calculator_rejects_unknown_backend():
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    y = np.arange(50) % 5
    with pytest.raises(ValueError, match="backend"):
        AccuracyCalculator(backend="bogus", include=KNN_METRICS).get_accuracy(x, y)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'faiss'"):
        AccuracyCalculator(backend="bogus")  # at construction, naming the valid ones
    ours = AccuracyCalculator(include=KNN_METRICS, k="max_bin_count",
                              backend=TorchBackend("l2")).get_accuracy(x, y)
    _close(ours, AccuracyCalculator(include=KNN_METRICS, k="max_bin_count").get_accuracy(x, y))
