"""Class-disjoint splits and folds (:mod:`contrastive.splits`) and the class-level split names
every data set reader accepts: the two sides never share a class, the folds cover the training
classes and never touch a test class, and the same seed gives the same folds."""

from __future__ import annotations

import numpy as np
import pytest

from contrastive.app.protocol import class_disjoint
from contrastive.datasets import get_dataset
from contrastive.splits import (
    class_disjoint_folds,
    class_disjoint_split,
    fold_split_name,
    parse_split_name,
)


def labels(n_classes=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_classes, size=400)


def test_split_is_class_disjoint_and_covers_everything():
    y = labels()
    tr, te = class_disjoint_split(y)
    assert set(y[tr]).isdisjoint(y[te])
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(y.size))
    assert set(y[te]) == set(range(6, 12))  # seed None: the last half of the sorted classes
    tr2, te2 = class_disjoint_split(y, test_classes=[0, 3])
    assert set(y[te2]) == {0, 3} and set(y[tr2]) == set(range(12)) - {0, 3}
    a = class_disjoint_split(y, fraction=0.25, seed=5)
    b = class_disjoint_split(y, fraction=0.25, seed=5)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert len(set(y[a[1]])) == 3
    with pytest.raises(ValueError, match="do not occur"):
        class_disjoint_split(y, test_classes=[99])
    with pytest.raises(ValueError, match="one class on each side"):
        class_disjoint_split(y, test_classes=range(12))


def test_folds_are_class_disjoint_cover_the_classes_and_are_seeded():
    y = labels(n_classes=10)
    folds = class_disjoint_folds(y, 3, seed=1)
    assert len(folds) == 3
    seen_val = []
    for tr, va in folds:
        assert set(y[tr]).isdisjoint(y[va])
        assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(y.size))
        seen_val.append(va)
    every = np.sort(np.concatenate(seen_val))
    assert np.array_equal(every, np.arange(y.size))  # each item validated on exactly once
    sizes = sorted(len(set(y[va])) for _, va in folds)
    assert sizes == [3, 3, 4]  # classes dealt evenly
    again = class_disjoint_folds(y, 3, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = class_disjoint_folds(y, 3, seed=2)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    with pytest.raises(ValueError, match="more than the 10 classes"):
        class_disjoint_folds(y, 11)
    with pytest.raises(ValueError, match=">= 2"):
        class_disjoint_folds(y, 1)


def test_folds_of_the_training_classes_never_touch_a_test_class():
    y = labels(n_classes=12, seed=3)
    tr, te = class_disjoint_split(y, fraction=0.5, seed=0)
    for f_tr, f_va in class_disjoint_folds(y[tr], 3, seed=0):
        for side in (tr[f_tr], tr[f_va]):  # back to indices of the whole set
            assert set(y[side]).isdisjoint(y[te])
        assert set(y[tr[f_va]]) | set(y[tr[f_tr]]) == set(y[tr])


def test_split_names_parse():
    assert parse_split_name("train") is None
    assert parse_split_name("train_classes").kind == "train_classes"
    spec = parse_split_name("fold1of3s7-val")
    assert (spec.kind, spec.fold, spec.n_folds, spec.seed, spec.part) == ("fold", 1, 3, 7, "val")
    assert fold_split_name(1, 3, "val", 7) == "fold1of3s7-val"
    assert parse_split_name(fold_split_name(0, 2, "train")).seed == 0
    with pytest.raises(ValueError, match="k < K"):
        parse_split_name("fold3of3-val")


def test_digits_class_splits_and_folds():
    train = get_dataset("digits", split="train_classes")
    test = get_dataset("digits", split="test_classes")
    assert train.classes == [0, 1, 2, 3, 4, 5] and test.classes == [6, 7, 8, 9]
    assert len(train) + len(test) == 1797 and class_disjoint(train, test)
    assert sorted(set(train.labels)) == list(range(6))  # renumbered within the split
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    keep = bunch.target >= 6
    np.testing.assert_array_equal(test.data.numpy(), x[keep])  # the items, in their order
    np.testing.assert_array_equal(np.asarray(test.classes)[test.labels], bunch.target[keep])
    val_classes = []
    for k in range(3):
        ftr = get_dataset("digits", split=fold_split_name(k, 3, "train"))
        fva = get_dataset("digits", split=fold_split_name(k, 3, "val"))
        assert class_disjoint(ftr, fva) and class_disjoint(fva, test) and class_disjoint(ftr,
                                                                                         test)
        assert len(ftr) + len(fva) == len(train)
        val_classes += fva.classes
    assert sorted(val_classes) == train.classes
    img = get_dataset("digits_image", split="fold0of3-val", size=16)
    assert img.kind == "image" and img[0][0].shape == (1, 16, 16)
    assert img.classes == get_dataset("digits", split="fold0of3-val").classes
