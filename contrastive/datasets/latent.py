"""``latent_classes``: a synthetic retrieval benchmark with a known answer, generated in memory
(no download, no file) -- the embedded default of the tuned, class-disjoint comparison.

Why it exists: on scikit-learn's digits split by class (train on 0-5, retrieve among 6-9) six
training classes are too few to learn features that transfer, so every trained embedding
retrieves worse than the raw pixels (measured MAP@R: raw pixels 66.6, an MLP trained with any of
the default losses 30-35, a small CNN 42-49). The deep-metric-learning benchmarks train on 100
classes or more and retrieve among 100 others; this set has that shape, and its raw input is a
poor embedding that training can improve a lot, up to a ceiling that is known.

The generative model (all draws from ``numpy.random.default_rng(seed)``, so the set is the same
on every machine):

* ``C`` class centres ``c_k ~ N(0, I_s)`` in an ``s``-dimensional signal space;
* item ``i`` of class ``y_i``: signal ``u_i = c_{y_i} + w * e_i`` with ``e_i ~ N(0, I_s)``, and
  a class-independent nuisance ``v_i ~ N(0, a^2 I_n)``;
* observation ``x_i = tanh(A^T [u_i; v_i] / r) Q`` in ``R^D``: ``A`` is a fixed ``(s + n) x D``
  Gaussian matrix with entries ``N(0, 1 / (s + n))``, ``r = sqrt((s (1 + w^2) + n a^2) /
  (s + n))`` the root-mean-square of the latent coordinates (so each pre-activation has unit
  variance), and ``Q`` a fixed random ``D x D`` orthogonal matrix (the ``Q`` factor of a
  Gaussian matrix; numpy's QR makes it a reflection, ``det Q = -1``, for even ``D``: distances
  and scores are the same as under a rotation).

Every class shares one signal space, so what an encoder learns on the training classes (undo
the mixing, discard the nuisance) transfers to unseen classes, as a good DML embedding should.
The nuisance spread ``a = 2`` is twice that of the class centres, so distances between raw
observations are dominated by it. The *known answer*: retrieval on the true signal ``u``
(``view="latent"``), the best a class-agnostic encoder can recover; the tuned report prints it
as ``(true latent)`` next to ``(raw input)``. Defaults (``C = 200``, 16 items per class,
``s = n = 8``, ``D = 64``, ``w = 0.35``, ``a = 2``) on the 100 test classes: raw input MAP@R
3.2, true latent 72.2.

Splits: ``"all"`` (class by class), ``"train"`` / ``"test"`` (a stratified 70/30 split of the
items, every class on both sides: the i.i.d. protocol) and, through the registry, the
class-disjoint ``"train_classes"`` (classes 0-99) / ``"test_classes"`` (100-199).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..validation import check_int
from .base import TensorDataset, check_split

__all__ = ["latent_classes", "generate_latent_classes"]

SPLITS = ("train", "test", "all")
VIEWS = ("observed", "latent")
#: the share of the items in the i.i.d. ``"test"`` split
TEST_FRACTION = 0.3


def _seed(seed: object) -> int:
    """``seed`` as an ``int >= 0``: the data are a function of it, so ``None`` (fresh entropy
    from the OS) is refused."""
    return check_int(seed, "seed", 0, why=" (the data are a function of it)")


def generate_latent_classes(
    n_classes: int = 200,
    per_class: int = 16,
    signal_dim: int = 8,
    nuisance_dim: int = 8,
    dim: int = 64,
    within: float = 0.35,
    nuisance: float = 2.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [N, dim], y [N], u [N, signal_dim])`` of the generative model in the module
    docstring (float32 observations and signals, int64 labels, class by class)."""
    n_classes, per_class, signal_dim, nuisance_dim, dim = (
        check_int(value, name, 1) for name, value in (
            ("n_classes", n_classes), ("per_class", per_class), ("signal_dim", signal_dim),
            ("nuisance_dim", nuisance_dim), ("dim", dim)))
    if n_classes < 2 or per_class < 2:
        raise ValueError(f"latent_classes needs n_classes >= 2 and per_class >= 2 to retrieve, "
                         f"got {n_classes} and {per_class}")
    if not all(math.isfinite(float(v)) and v >= 0 for v in (within, nuisance)):
        raise ValueError(f"within and nuisance are spreads: finite and >= 0, got {within!r}, "
                         f"{nuisance!r}")
    seed = _seed(seed)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, signal_dim))
    y = np.repeat(np.arange(n_classes), per_class)
    u = centres[y] + within * rng.standard_normal((y.size, signal_dim))
    v = nuisance * rng.standard_normal((y.size, nuisance_dim))
    k = signal_dim + nuisance_dim
    mixing = rng.standard_normal((k, dim)) / np.sqrt(k)
    rms = np.sqrt((signal_dim * (1 + within**2) + nuisance_dim * nuisance**2) / k)
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    x = np.tanh(np.concatenate([u, v], axis=1) @ mixing / rms) @ rotation
    return x.astype(np.float32), y.astype(np.int64), u.astype(np.float32)


def _split_indices(y: np.ndarray, split: str, seed: int) -> np.ndarray:
    """The sorted item indices of ``split``: all of them, or one side of scikit-learn's
    stratified split with ``n_test = ceil(0.3 N)`` and ``n_train = N - n_test`` items. Every class
    is on both sides exactly when both sides hold at least ``C`` items (each class gets at least
    ``floor(n_side / C)`` of them); otherwise a ValueError names ``per_class`` and the fix."""
    if split == "all":
        return np.arange(y.size)
    from sklearn.model_selection import train_test_split

    n_classes, per_class = int(y.max()) + 1, y.size // (int(y.max()) + 1)
    if min(_iid_sides(n_classes, per_class)) < n_classes:
        fit = next(p for p in range(per_class + 1, per_class + 8)
                   if min(_iid_sides(n_classes, p)) >= n_classes)
        n_train, n_test = _iid_sides(n_classes, per_class)
        raise ValueError(
            f"latent_classes split {split!r} is a stratified {1 - TEST_FRACTION:.0%}/"
            f"{TEST_FRACTION:.0%} split with every class on both sides, but {n_classes} classes "
            f"of per_class={per_class} items give {n_train} train / {n_test} test items, fewer "
            f"than the classes: pass per_class >= {fit}, or use split 'all', 'train_classes' or "
            f"'test_classes'")
    train, test = train_test_split(np.arange(y.size), test_size=TEST_FRACTION, stratify=y,
                                   random_state=seed)
    return np.sort(train if split == "train" else test)


def _iid_sides(n_classes: int, per_class: int) -> tuple[int, int]:
    """``(n_train, n_test)`` of the i.i.d. split of ``N = n_classes * per_class`` items:
    ``n_test = ceil(0.3 N)``, scikit-learn's rounding."""
    n = n_classes * per_class
    n_test = math.ceil(TEST_FRACTION * n)
    return n - n_test, n_test


def latent_classes(
    root=None,
    split: str = "all",
    transform: Callable | None = None,
    view: str = "observed",
    **params,
) -> TensorDataset:
    """The synthetic benchmark of the module docstring as float32 vectors (``kind="vector"``):
    the observations ``x`` (``view="observed"``) or, item for item, the true class signal ``u``
    (``view="latent"``: the known answer, for reference rows). ``params`` go to
    :func:`generate_latent_classes`; ``root`` is ignored."""
    check_split(split, SPLITS, "latent_classes")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS} for 'latent_classes', got {view!r}")
    x, y, u = generate_latent_classes(**params)
    idx = _split_indices(y, split, _seed(params.get("seed", 0)))
    data = torch.from_numpy(np.ascontiguousarray((x if view == "observed" else u)[idx]))
    n_classes = int(y.max()) + 1
    return TensorDataset(data, y[idx], list(range(n_classes)), "vector", transform,
                         f"latent_classes[{split}]")
