"""Linear probe: multinomial logistic regression on frozen embeddings, the standard judge of a
representation (Tschannen et al. 2020 evaluate every encoder this way).

Two protocols:

* ``"torch"`` (default): full-batch multinomial logistic regression fitted with L-BFGS
  (strong-Wolfe line search) in torch on the best device, optionally after standardising the
  features, with a small sweep of weight decay chosen on a stratified validation split of the
  training set and a refit on all of it. The objective is::

      L(W, b) = (1/n) sum_i CE(W x_i + b, y_i) + (wd / 2) ||W||_F^2        (bias not penalised)

  scikit-learn's ``LogisticRegression`` minimises ``C sum_i CE_i + (1/2) ||W||^2``; dividing it by
  ``C n`` gives ``(1/n) sum_i CE_i + 1/(2 C n) ||W||^2``, the same problem when
  ``wd = 1 / (C n)``, i.e. ``C = 1 / (wd n)`` (:func:`sklearn_C`). With two classes scikit-learn
  fits one logit ``w`` instead of two softmax rows; at the optimum the rows are ``+-w/2`` and the
  penalty ``wd/2 (2 ||w/2||^2) = wd/4 ||w||^2``, so there ``C = 2 / (wd n)``.
* ``"tschannen2020"``: the paper's protocol, unchanged: ``MinMaxScaler`` fitted on the training
  features, then ``sklearn.linear_model.LogisticRegression(solver="saga", C=10, tol=0.1)``
  (multinomial for three or more classes), no sweep.

Test labels that never occur in training are counted as errors (the probe can only predict
training classes), as scikit-learn does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from contrastive.devices import resolve_device
from contrastive.validation import check_int

from ._inputs import _to_numpy, as_float_matrix, as_labels, check_same_dim

__all__ = [
    "linear_probe",
    "fit_logistic_regression",
    "softmax_regression_loss_grad",
    "stratified_split",
    "sklearn_C",
    "DEFAULT_WEIGHT_DECAYS",
    "PROTOCOLS",
]

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
PROTOCOLS = ("torch", "tschannen2020")


# --------------------------------------------------------------------------- pure helpers


def sklearn_C(weight_decay: float, n_train: int, num_classes: int = 3) -> float:
    """scikit-learn's ``C`` for the same problem as our ``weight_decay`` on ``n_train`` samples.

    ``C = 1 / (wd n)`` (multinomial, three or more classes) and ``C = 2 / (wd n)`` for two classes
    (scikit-learn's binary model has one logit; see the module docstring). ``wd = 0`` is
    ``C = inf`` (no penalty).
    """
    if weight_decay < 0 or not math.isfinite(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if weight_decay == 0:
        return math.inf
    scale = 2.0 if num_classes == 2 else 1.0
    return scale / (weight_decay * n_train)


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: from each class ``round(val_fraction * n_c)`` items go to
    validation, at least one and never all of them (a class with one item stays in training).
    Deterministic from ``seed``; both index arrays are sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_val = int(round(val_fraction * idx.size))
        n_val = 0 if idx.size < 2 else min(max(n_val, 1), idx.size - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _standardizer(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and (population) standard deviation; constant features get scale 1."""
    std, mean = torch.std_mean(x, dim=0, correction=0)
    std = torch.where(std > 1e-12 * (1.0 + mean.abs()), std, torch.ones_like(std))
    return mean, std


_BLOCK_ELEMS = 1 << 24  # logits per row block: 64 MiB in float32, whatever N x K is


def _row_blocks(n: int, k: int) -> int:
    return max(1, min(n, _BLOCK_ELEMS // max(1, k)))


def softmax_regression_loss_grad(
    x: Tensor, y: Tensor, w: Tensor, b: Tensor, weight_decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and gradient of ``L = (1/n) sum_i CE(W x_i + b, y_i) + (wd/2) ||W||^2`` in closed
    form, ``dL/dlogits = (softmax - onehot) / n``::

        dL/dW = (1/n) (P - Y)^T X + wd W,    dL/db = (1/n) sum_i (P - Y)_i

    computed over row blocks of at most ``2^24`` logits, with one logits buffer per block (the
    softmax is formed in place), so memory is ``O(block x K + K x d)`` rather than autograd's
    several ``N x K`` buffers. Returns ``(loss, dL/dW, dL/db)``.
    """
    n, k = x.shape[0], w.shape[0]
    rows = _row_blocks(n, k)
    gw = torch.zeros_like(w)
    gb = torch.zeros_like(b)
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for s in range(0, n, rows):
        xb, yb = x[s : s + rows], y[s : s + rows]
        logits = torch.addmm(b, xb, w.T)
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        total += (lse.squeeze(1) - logits.gather(1, yb[:, None]).squeeze(1)).sum()
        p = logits.sub_(lse).exp_()  # softmax, in place
        p.scatter_add_(1, yb[:, None], torch.full_like(lse, -1.0))
        gw.addmm_(p.T, xb)
        gb += p.sum(0)
    loss = total / n
    gw.div_(n)
    gb.div_(n)
    if weight_decay > 0:
        loss = loss + 0.5 * weight_decay * (w * w).sum()
        gw.add_(w, alpha=weight_decay)
    return loss, gw, gb


def fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Minimise ``(1/n) sum_i CE(W x_i + b, y_i) + (wd/2) ||W||^2`` over ``W [K, d]``, ``b [K]``
    with full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search, history 20) on
    ``x``'s device and dtype; the gradient is the closed form of
    :func:`softmax_regression_loss_grad`.

    Stops when the largest gradient entry is below ``tol`` (the criterion of scikit-learn's lbfgs,
    whose objective is scaled the same way, but tighter than its default ``1e-4``: a warm start
    from a nearby weight decay already has a gradient near ``1e-4`` and would stop at once) or
    after ``max_iter`` iterations. ``init`` warm-starts from ``(W, b)``. Returns
    ``(W, b, iterations)``.
    """
    k, d = num_classes, x.shape[1]
    if init is None:
        w = torch.zeros(k, d, device=x.device, dtype=x.dtype)
        b = torch.zeros(k, device=x.device, dtype=x.dtype)
    else:
        w, b = (t.detach().to(device=x.device, dtype=x.dtype).clone() for t in init)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    wd = float(weight_decay)

    def closure() -> Tensor:
        loss, w.grad, b.grad = softmax_regression_loss_grad(x, y, w, b, wd)
        return loss

    with torch.no_grad():
        opt.step(closure)
    n_iter = int(opt.state[w].get("n_iter", 0))
    return w, b, n_iter


def _accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> float:
    """Fraction of rows whose argmax logit equals ``y`` (``y = -1`` never matches)."""
    rows = _row_blocks(x.shape[0], w.shape[0])
    hits = sum(
        int((torch.addmm(b, x[s : s + rows], w.T).argmax(1) == y[s : s + rows]).sum())
        for s in range(0, x.shape[0], rows)
    )
    return hits / x.shape[0]


# --------------------------------------------------------------------------- input handling


def _as_features(x: object, name: str) -> np.ndarray:
    """``x`` as a validated C-contiguous ``[N, d]`` matrix: float64 when it is given in float64,
    float32 otherwise.

    The checks are those of :func:`~evaluation._inputs.as_float_matrix`, which also casts to
    float32; a float64 input keeps its own values, so that ``dtype=torch.float64`` and the
    scikit-learn protocol see the features as given (``1e4 + 1e-4 z`` holds no ``z`` in
    float32, whose spacing at ``1e4`` is about ``1e-3``).
    """
    raw = _to_numpy(x, name)
    checked = as_float_matrix(raw, name)
    if raw.dtype == np.float64:
        return np.ascontiguousarray(raw)
    return checked


def _check_seed(seed: object) -> int | None:
    """``seed`` if it is ``None`` or an integer in ``[0, 2**32 - 1]``, the seeds that both
    numpy's ``default_rng`` (the validation split) and scikit-learn's ``random_state`` (saga's
    shuffling) accept."""
    if seed is None:
        return None
    return check_int(seed, "seed", 0, 2**32 - 1, why=" (e.g. seed=0)")


def _check_inputs(train_x, train_y, test_x, test_y):
    """Validate and convert to numpy: float64 matrices where given in float64 (float32
    otherwise), int64 labels, equal feature dims."""
    xtr = _as_features(train_x, "train_x")
    xte = _as_features(test_x, "test_x")
    ytr = as_labels(train_y, xtr.shape[0], "train_y")
    yte = as_labels(test_y, xte.shape[0], "test_y")
    check_same_dim(xtr, xte, "train_x", "test_x")
    classes = np.unique(ytr)
    if classes.size < 2:
        raise ValueError(
            f"train_y holds a single class ({classes.tolist()}); a classifier needs at least two"
        )
    return xtr, ytr, xte, yte, classes


def _is_real(v: object) -> bool:
    """A real number: Python's or numpy's (``np.float32(1e-3)``, ``np.int64(0)``), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _check_weight_decays(weight_decays: float | Iterable[float] | None) -> list[float]:
    if weight_decays is None:
        return list(DEFAULT_WEIGHT_DECAYS)
    if _is_real(weight_decays) or (
        isinstance(weight_decays, np.ndarray) and weight_decays.ndim == 0
    ):
        values = [float(weight_decays)]  # type: ignore[arg-type]
    else:
        try:
            values = [float(v) for v in weight_decays]  # type: ignore[union-attr]
        except (TypeError, ValueError) as exc:
            raise TypeError(
                "weight_decays must be a number or a sequence of numbers, e.g. (1e-3, 1e-4), "
                f"got {weight_decays!r}"
            ) from exc
    if not values:
        raise ValueError("weight_decays is empty; pass at least one value, e.g. (1e-4,)")
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"weight_decays must be finite and >= 0, got {v!r}")
    # strongest regularisation first: each fit warm-starts the next, weaker one
    return sorted(set(values), reverse=True)


# --------------------------------------------------------------------------- protocols


def _probe_torch(
    xtr, ytr, xte, yte, classes, weight_decays, val_fraction, max_iter, tol, device, dtype,
    seed, standardize,
) -> dict:
    dev = resolve_device(device)
    # class ids -> 0..K-1; test labels unseen in training map to -1 (always wrong)
    ytr_idx = np.searchsorted(classes, ytr)
    pos = np.clip(np.searchsorted(classes, yte), 0, classes.size - 1)
    yte_idx = np.where(classes[pos] == yte, pos, -1)
    k = int(classes.size)
    x_all = torch.from_numpy(xtr).to(device=dev, dtype=dtype)
    y_all = torch.from_numpy(ytr_idx).to(dev)
    x_test = torch.from_numpy(xte).to(device=dev, dtype=dtype)
    y_test = torch.from_numpy(yte_idx).to(dev)

    def prepare(fit_x: Tensor, *others: Tensor) -> list[Tensor]:
        if not standardize:
            return [fit_x, *others]
        mean, std = _standardizer(fit_x)
        return [(t - mean).div_(std) for t in (fit_x, *others)]

    val_accs: dict[float, float] = {}
    init = None
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in (0, 1) for a weight-decay sweep, got {val_fraction!r}"
            )
        tr_idx, va_idx = stratified_split(ytr_idx, val_fraction, seed)
        if va_idx.size == 0:
            raise ValueError(
                "no class in train_y has two or more items, so no validation split can be made; "
                "pass a single weight_decays value to skip the sweep"
            )
        tr_t = torch.from_numpy(tr_idx).to(dev)
        va_t = torch.from_numpy(va_idx).to(dev)
        x_fit, x_val = prepare(x_all[tr_t], x_all[va_t])
        best = -1.0
        for wd in weight_decays:
            w, b, _ = fit_logistic_regression(
                x_fit, y_all[tr_t], k, wd, max_iter=max_iter, tol=tol, init=init
            )
            init = (w, b)
            acc = _accuracy(x_val, y_all[va_t], w, b)
            val_accs[wd] = acc
            if acc > best:  # ties keep the stronger (earlier) weight decay
                best, chosen, best_init = acc, wd, (w, b)
        init = best_init
        del x_fit, x_val
    x_fit, x_eval = prepare(x_all, x_test)
    w, b, n_iter = fit_logistic_regression(
        x_fit, y_all, k, chosen, max_iter=max_iter, tol=tol, init=init
    )
    return {
        "accuracy": _accuracy(x_eval, y_test, w, b),
        "train_accuracy": _accuracy(x_fit, y_all, w, b),
        "weight_decay": chosen,
        "C": sklearn_C(chosen, int(xtr.shape[0]), k),
        "val_accuracy": val_accs[chosen] if val_accs else None,
        "val_accuracies": val_accs,
        "n_iter": n_iter,
        "device": str(dev),
    }


def _probe_tschannen2020(xtr, ytr, xte, yte, max_iter: int, seed: int | None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import MinMaxScaler

    scaler = MinMaxScaler().fit(xtr)
    clf = LogisticRegression(solver="saga", C=10.0, tol=0.1, max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(xtr), ytr)
    return {
        "accuracy": float(clf.score(scaler.transform(xte), yte)),
        "train_accuracy": float(clf.score(scaler.transform(xtr), ytr)),
        "weight_decay": None,
        "C": 10.0,
        "val_accuracy": None,
        "val_accuracies": {},
        "n_iter": int(np.max(clf.n_iter_)),
        "device": "cpu",
    }


def linear_probe(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor | Sequence[int],
    test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor | Sequence[int],
    protocol: str = "torch",
    weight_decays: float | Iterable[float] | None = None,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    tol: float = 1e-6,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    standardize: bool = True,
) -> dict:
    """Test accuracy of a multinomial logistic-regression probe on frozen features.

    Args:
        train_x, test_x: features ``[N, d]`` (numpy or torch on any device; validated on the
            host, float64 kept as float64 and anything else cast to float32, then cast to
            ``dtype`` on ``device``; ``"tschannen2020"`` gives them to scikit-learn as they are).
        train_y, test_y: integer class ids ``[N]``.
        protocol: ``"torch"`` (L-BFGS on device, weight-decay sweep) or ``"tschannen2020"``
            (MinMax scaling + scikit-learn saga, ``C=10``, ``tol=0.1``; Tschannen et al. 2020).
        weight_decays: ``wd`` of ``(1/n) sum CE + (wd/2)||W||^2``. Several values: each is fitted
            on a stratified ``1 - val_fraction`` share of train, the best validation accuracy
            wins (ties: the larger ``wd``), then the probe is refit on all of train. One value:
            no sweep. Default :data:`DEFAULT_WEIGHT_DECAYS`. Equivalent scikit-learn ``C``:
            :func:`sklearn_C`. Not used by ``"tschannen2020"``.
        val_fraction: validation share of each class for the sweep.
        max_iter, tol: L-BFGS iteration cap and gradient tolerance (``max_iter`` is also the
            saga epoch cap of ``"tschannen2020"``).
        device: ``None`` picks CUDA when available, else CPU.
        dtype: compute dtype of the torch protocol (``torch.float64`` for exact parity checks).
        seed: validation split (and saga's shuffling); an integer in ``[0, 2**32 - 1]``, or
            ``None`` for a fresh random draw.
        standardize: z-score features with the training statistics first (torch protocol).

    Returns:
        dict with ``accuracy`` (test, in [0, 1]), ``train_accuracy``, ``protocol``,
        ``weight_decay`` (chosen; ``None`` for tschannen2020), ``C`` (scikit-learn equivalent),
        ``val_accuracy`` (of the chosen value; ``None`` without a sweep), ``val_accuracies``
        (``{wd: accuracy}``), ``n_iter`` (iterations of the final fit), ``num_classes``,
        ``n_train``, ``n_test``, ``device``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not (_is_real(max_iter) and isinstance(max_iter, (int, np.integer)) and max_iter > 0):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (_is_real(tol) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    max_iter, tol = int(max_iter), float(tol)
    seed = _check_seed(seed)
    xtr, ytr, xte, yte, classes = _check_inputs(train_x, train_y, test_x, test_y)
    if protocol == "tschannen2020":
        if weight_decays is not None:
            raise ValueError(
                "protocol='tschannen2020' uses the paper's fixed C=10 and no sweep; leave "
                "weight_decays unset or use protocol='torch'"
            )
        out = _probe_tschannen2020(xtr, ytr, xte, yte, max_iter, seed)
    else:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        wds = _check_weight_decays(weight_decays)
        if dtype == torch.float32:  # cast on the host: half the bytes to move to the device
            xtr, xte = xtr.astype(np.float32, copy=False), xte.astype(np.float32, copy=False)
        out = _probe_torch(
            xtr, ytr, xte, yte, classes, wds, val_fraction, max_iter, tol, device, dtype, seed,
            standardize,
        )
    out.update(
        protocol=protocol,
        num_classes=int(classes.size),
        n_train=int(xtr.shape[0]),
        n_test=int(xte.shape[0]),
    )
    return out
