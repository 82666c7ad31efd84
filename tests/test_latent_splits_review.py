"""Review of ``latent_classes`` (:mod:`contrastive.datasets.latent`) and the class-disjoint splits
(:mod:`contrastive.splits`) against independent references: the known answer recomputed with
scikit-learn's exact nearest neighbours, the documented distribution checked by sampling and by
closed forms, the splits and folds checked by brute force over the items."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from contrastive.datasets import get_dataset
from contrastive.datasets.latent import generate_latent_classes, latent_classes
from contrastive.splits import (
    class_disjoint_folds,
    class_disjoint_split,
    fold_split_name,
    parse_split_name,
)


# --------------------------------------------------------------------------- references
def _map_at_r(x: np.ndarray, y: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020) by scikit-learn's brute-force cosine neighbours:
    ``MAP@R = mean_i (1/R_i) sum_{k<=R_i} P_i(k) rel_i(k)``, ``R_i`` = other items of y_i."""
    r_max = int(np.bincount(y).max()) - 1
    nn = NearestNeighbors(n_neighbors=r_max + 1, metric="cosine", algorithm="brute").fit(x)
    _, idx = nn.kneighbors(x)
    scores = []
    for i in range(y.size):
        others = [j for j in idx[i] if j != i][:r_max]
        r = int((y == y[i]).sum()) - 1
        rel = (y[others[:r]] == y[i]).astype(float)
        scores.append(float((np.cumsum(rel) / np.arange(1, r + 1) * rel).sum() / r))
    return float(np.mean(scores))


def _brute_force_fold_check(y: np.ndarray, folds, n_folds: int) -> None:
    """Every fold's sides are a partition of the items with no class in common; every class is
    validated exactly once; group sizes (in classes) differ by at most one."""
    assert len(folds) == n_folds
    seen = np.zeros(y.size, dtype=int)
    sizes = []
    for tr, va in folds:
        assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(y.size))
        assert not set(y[tr].tolist()) & set(y[va].tolist())
        seen[va] += 1
        sizes.append(len(set(y[va].tolist())))
    assert (seen == 1).all()
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- passing cross-checks
def test_known_answer_recomputed_with_sklearn():
    """The docstring's numbers on the 100 test classes: raw input 3.2, true latent 72.2."""
    x, y, u = generate_latent_classes()
    test = y >= 100
    assert _map_at_r(x[test], y[test]) == pytest.approx(0.032, abs=0.001)
    assert _map_at_r(u[test], y[test]) == pytest.approx(0.722, abs=0.001)


def test_documented_distribution_by_sampling():
    """Class balance, dimensions, centre spread 1, within-class spread w, and unit-variance
    pre-activations ``A^T [u; v] / r`` (closed form ``E|z|^2 / (k r^2) = 1``)."""
    s, n, d, w, a, c, p = 5, 3, 256, 0.5, 1.5, 300, 8
    x, y, u = generate_latent_classes(c, p, s, n, d, w, a, seed=3)
    assert x.shape == (c * p, d) and u.shape == (c * p, s) and y.shape == (c * p,)
    assert (np.bincount(y) == p).all() and np.array_equal(np.unique(y), np.arange(c))
    centres = np.stack([u[y == k].mean(0) for k in range(c)])
    within = u - centres[y]
    assert np.sqrt((within**2).sum() / (y.size - c) / s) == pytest.approx(w, rel=0.05)
    assert centres.var() == pytest.approx(1 + w * w / p, rel=0.1)
    # Q is orthogonal, so mean_i |x_i|^2 / D = E tanh(g)^2 with g = a^T z / r, a ~ N(0, I_k / k),
    # z = [u; v]: the same expectation by an independent Monte Carlo draw of the model
    k = s + n
    r = math.sqrt((s * (1 + w * w) + n * a * a) / k)
    rng = np.random.default_rng(123)
    cols = rng.standard_normal((200_000, k)) / math.sqrt(k)
    z = np.hstack([math.sqrt(1 + w * w) * rng.standard_normal((200_000, s)),
                   a * rng.standard_normal((200_000, n))])
    g = (cols * z).sum(1) / r
    assert g.var() == pytest.approx(1.0, abs=0.02)  # unit-variance pre-activations
    assert float((x**2).sum(1).mean() / d) == pytest.approx(np.mean(np.tanh(g) ** 2), rel=0.05)


def test_splits_brute_force_many_label_sets():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n_classes = int(rng.integers(2, 15))
        ids = rng.choice(10_000, size=n_classes, replace=False) - 5_000  # not contiguous
        y = ids[rng.integers(0, n_classes, size=int(rng.integers(n_classes, 80)))]
        if np.unique(y).size < 2:
            continue
        for n_folds in range(2, np.unique(y).size + 1):
            _brute_force_fold_check(y, class_disjoint_folds(y, n_folds, seed=trial), n_folds)
        tr, te = class_disjoint_split(y, seed=trial if trial % 2 else None)
        assert not set(y[tr].tolist()) & set(y[te].tolist())
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(y.size))


def test_latent_iid_split_sizes_and_classes():
    """``train`` / ``test``: 70/30 of the items (``n_test = ceil(0.3 N)``), every class on both
    sides, disjoint, covering ``all``, reproducible from the seed."""
    for c, p, seed in ((200, 16, 0), (7, 5, 2), (3, 4, 1)):
        tr = latent_classes(split="train", n_classes=c, per_class=p, seed=seed)
        te = latent_classes(split="test", n_classes=c, per_class=p, seed=seed)
        n = c * p
        assert (len(tr), len(te)) == (n - math.ceil(0.3 * n), math.ceil(0.3 * n))
        assert set(tr.labels.tolist()) == set(te.labels.tolist()) == set(range(c))
        every = latent_classes(split="all", n_classes=c, per_class=p, seed=seed).data.numpy()
        rows = {tuple(r) for r in every}
        assert {tuple(r) for r in tr.data.numpy()} | {tuple(r) for r in te.data.numpy()} == rows
        again = latent_classes(split="test", n_classes=c, per_class=p, seed=seed)
        assert np.array_equal(again.data.numpy(), te.data.numpy())


# --------------------------------------------------------------------------- bugs
@pytest.mark.parametrize("split", ["train", "test"])
def test_iid_split_with_too_few_items_names_per_class(split):
    with pytest.raises(ValueError, match=r"per_class.*(>=|at least) 4"):
        latent_classes(split=split, n_classes=50, per_class=2)


def test_generator_seed_none_is_refused_with_a_named_error():
    with pytest.raises(ValueError, match="seed"):
        generate_latent_classes(n_classes=2, per_class=2, seed=None)
    with pytest.raises(ValueError, match="seed"):
        latent_classes(n_classes=2, per_class=2, seed=None)


def test_generator_accepts_numpy_integers():
    a = generate_latent_classes(np.int64(3), np.int64(2), dim=np.int32(4), seed=np.int64(5))
    b = generate_latent_classes(3, 2, dim=4, seed=5)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)


@pytest.mark.parametrize("kw", [{"within": math.inf}, {"nuisance": math.inf}])
def test_generator_refuses_infinite_spreads(kw):
    with pytest.raises(ValueError, match="finite"):
        generate_latent_classes(n_classes=2, per_class=2, **kw)


def test_folds_seed_none_is_refused():
    y = np.repeat(np.arange(20), 3)
    with pytest.raises(ValueError, match="seed"):
        class_disjoint_folds(y, 2, seed=None)


def test_split_negative_seed_is_named():
    with pytest.raises(ValueError, match="seed"):
        class_disjoint_split(np.repeat(np.arange(4), 2), seed=-1)
    with pytest.raises(ValueError, match="seed"):
        class_disjoint_folds(np.repeat(np.arange(4), 2), 2, seed=-1)


def test_fold_split_name_round_trips_or_refuses():
    for fold, n_folds, seed in ((0, 2, 0), (2, 3, 7), (9, 10, 123)):
        spec = parse_split_name(fold_split_name(fold, n_folds, "val", seed))
        assert (spec.fold, spec.n_folds, spec.seed, spec.part) == (fold, n_folds, seed, "val")
    with pytest.raises(ValueError, match="seed"):
        fold_split_name(0, 2, "val", seed=-1)
    with pytest.raises(ValueError, match="fold"):
        fold_split_name(2, 2, "train")
    with pytest.raises(ValueError, match="n_folds"):
        fold_split_name(0, 1, "train")


def test_too_many_folds_names_the_fix():
    with pytest.raises(ValueError, match=r"n_folds.*<= 2"):
        get_dataset("latent_classes", split="fold0of3-val", n_classes=4, per_class=2)


def test_iid_split_every_class_on_both_sides_or_a_named_error():
    """Brute force over small sizes: the split exists exactly when both sides can hold one item
    of every class (``ceil(0.3 N) >= C`` and ``N - ceil(0.3 N) >= C``)."""
    for c in range(2, 13):
        for p in range(2, 6):
            n_test = math.ceil(0.3 * c * p)
            feasible = min(n_test, c * p - n_test) >= c
            if not feasible:
                with pytest.raises(ValueError, match="per_class"):
                    latent_classes(split="test", n_classes=c, per_class=p, dim=2)
                continue
            tr = latent_classes(split="train", n_classes=c, per_class=p, dim=2)
            te = latent_classes(split="test", n_classes=c, per_class=p, dim=2)
            assert len(te) == n_test
            assert set(tr.labels.tolist()) == set(te.labels.tolist()) == set(range(c))


def test_split_argument_errors_are_named():
    with pytest.raises(ValueError, match="test_classes must be a list"):
        class_disjoint_split(np.repeat(np.arange(4), 2), test_classes=3)
    with pytest.raises(ValueError, match="need at least 2 classes"):
        class_disjoint_folds(np.zeros(5, dtype=int), 2)
