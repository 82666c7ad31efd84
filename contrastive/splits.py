"""Class-disjoint splits and cross-validation folds: the deep-metric-learning protocol (train on
some classes, retrieve among classes never seen in training), as index arrays over a label
vector.

* :func:`class_disjoint_split` -- ``(train_idx, test_idx)``: every item of a test class goes to
  the test side, every other item to the training side.
* :func:`class_disjoint_folds` -- ``K`` folds of the training classes: the classes are shuffled
  (seeded) and dealt into ``K`` groups of near-equal size; fold ``k`` validates on group ``k``
  and trains on the others, so every class is validated on exactly once and no fold's two sides
  share a class (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020, tune
  on class-disjoint folds of the training classes).
* :func:`parse_split_name` -- the split names every data set reader accepts on top of its own
  (:mod:`contrastive.datasets`): ``"train_classes"``, ``"test_classes"`` and
  ``"fold{k}of{K}-train"`` / ``"fold{k}of{K}-val"`` (optionally ``"fold{k}of{K}s{seed}-..."``;
  seed 0 by default), the folds being folds of the training classes.

Everything here is a pure function of the labels (numpy in, numpy out); nothing reads data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .validation import check_int

__all__ = ["class_disjoint_split", "class_disjoint_folds", "parse_split_name", "SplitSpec",
           "fold_split_name", "CLASS_SPLITS"]

#: The class-level split names every reader accepts.
CLASS_SPLITS = ("train_classes", "test_classes")

_FOLD = re.compile(r"^fold(\d+)of(\d+)(?:s(\d+))?-(train|val)$")


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-d array of class ids, got shape {y.shape}")
    return y


def _seed(seed: object) -> int:
    """``seed`` as an ``int >= 0``; the splits are a pure function of it, so ``None`` (fresh
    entropy) and negative values (refused by numpy without naming the argument) are errors."""
    return check_int(seed, "seed", 0, why=" (the split is a pure function of the labels and "
                     "the seed)")


def class_disjoint_split(
    labels: Sequence[int] | np.ndarray,
    test_classes: Iterable[int] | None = None,
    fraction: float = 0.5,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``, sorted int64 index arrays into ``labels`` whose classes never
    overlap.

    The test classes are ``test_classes`` when given (each must occur in ``labels``); otherwise
    ``n = round(fraction * C)`` of the ``C`` distinct classes (at least one on each side): the
    last ``n`` in sorted order when ``seed`` is None (the CUB / Cars convention, classes
    1-100 / 101-200), a seeded random choice (``np.random.default_rng(seed)``) otherwise.
    """
    y = _labels(labels)
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError(f"a class-disjoint split needs at least 2 classes, got {classes.size}")
    if test_classes is not None:
        if isinstance(test_classes, (str, bytes)) or not isinstance(test_classes, Iterable):
            raise ValueError(f"test_classes must be a list of class ids, got {test_classes!r}; "
                             f"pass [{test_classes!r}] for one class")
        chosen = np.unique(np.asarray(list(test_classes)))
        unknown = np.setdiff1d(chosen, classes)
        if unknown.size:
            raise ValueError(f"test_classes {unknown.tolist()} do not occur in labels")
        if chosen.size == 0 or chosen.size == classes.size:
            raise ValueError("test_classes must leave at least one class on each side")
    else:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        n = min(max(int(round(fraction * classes.size)), 1), classes.size - 1)
        if seed is None:
            chosen = classes[-n:]
        else:
            rng = np.random.default_rng(_seed(seed))
            chosen = np.sort(rng.choice(classes, size=n, replace=False))
    is_test = np.isin(y, chosen)
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def class_disjoint_folds(
    labels: Sequence[int] | np.ndarray, n_folds: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` pairs ``(train_idx, val_idx)`` of sorted int64 indices into ``labels``.

    The distinct classes are permuted with ``np.random.default_rng(seed)`` and dealt round-robin
    into ``n_folds`` groups (sizes differ by at most one); fold ``k`` validates on the items of
    group ``k`` and trains on all the others. Every item is validated on exactly once, and the two
    sides of a fold never share a class. Needs ``2 <= n_folds <= C`` and an int ``seed >= 0``
    (the folds are a pure function of the labels and the seed).
    """
    y = _labels(labels)
    classes = np.unique(y)
    n_folds = check_int(n_folds, "n_folds", 2)
    if n_folds > classes.size:
        fix = (f"pass n_folds <= {classes.size}" if classes.size >= 2
               else "the labels need at least 2 classes")
        raise ValueError(f"n_folds={n_folds} is more than the {classes.size} classes; every fold "
                         f"needs at least one validation class: {fix}")
    order = np.random.default_rng(_seed(seed)).permutation(classes)
    folds = []
    for k in range(n_folds):
        val = np.isin(y, order[k::n_folds])
        folds.append((np.flatnonzero(~val).astype(np.int64), np.flatnonzero(val).astype(np.int64)))
    return folds


@dataclass(frozen=True)
class SplitSpec:
    """A parsed class-level split name: ``kind`` is ``"train_classes"``, ``"test_classes"`` or
    ``"fold"`` (then ``fold`` / ``n_folds`` / ``seed`` / ``part`` in ``{"train", "val"}``)."""

    kind: str
    fold: int = 0
    n_folds: int = 0
    seed: int = 0
    part: str = ""


def parse_split_name(split: str) -> SplitSpec | None:
    """The :class:`SplitSpec` of a class-level split name, or None for a reader's own split
    (``"train"``, ``"test"``, ...). ``"fold1of3-val"`` is fold 1 (0-based) of 3 of the training
    classes, seed 0; ``"fold1of3s7-train"`` the same with seed 7."""
    if not isinstance(split, str):
        return None
    if split in CLASS_SPLITS:
        return SplitSpec(kind=split)
    m = _FOLD.match(split)
    if m is None:
        return None
    k, n = int(m.group(1)), int(m.group(2))
    if n < 2 or k >= n:
        raise ValueError(f"split {split!r}: need fold k < K and K >= 2 (folds are 0-based)")
    return SplitSpec(kind="fold", fold=k, n_folds=n, seed=int(m.group(3) or 0), part=m.group(4))


def fold_split_name(fold: int, n_folds: int, part: str, seed: int = 0) -> str:
    """The split name of one side of a fold: ``fold_split_name(1, 3, "val") == "fold1of3-val"``;
    :func:`parse_split_name` reads it back, so ``0 <= fold < n_folds``, ``n_folds >= 2`` and
    ``seed >= 0`` are checked here (a name it cannot read would reach the reader as an unknown
    split)."""
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    n_folds = check_int(n_folds, "n_folds", 2)
    fold = check_int(fold, "fold", 0, n_folds - 1, why=f" (0-based, n_folds={n_folds})")
    seed = _seed(seed)
    return f"fold{fold}of{n_folds}{f's{seed}' if seed else ''}-{part}"
