"""Input conversion and validation shared by the evaluation package.

Every public evaluation function accepts numpy arrays or torch tensors (any device, with or
without gradient) and funnels them through these helpers, so a bad argument fails the same way
everywhere: ``TypeError`` for the wrong kind of object, ``ValueError`` for the wrong shape or
values, and each message names the argument and says how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

__all__ = [
    "as_float_matrix",
    "as_labels",
    "check_k",
    "check_metric",
    "check_same_dim",
    "check_score_range",
    "METRICS",
]

METRICS = ("cosine", "ip", "l2")


def _to_numpy(x: object, name: str) -> np.ndarray:
    """Turn a numpy array, torch tensor or nested sequence into a numpy array (no copy if able)."""
    if x is None:
        raise TypeError(f"{name} is None; pass a numpy array or a torch tensor")
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (str, bytes, dict, set)):
        raise TypeError(
            f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}"
        )
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - numpy's own message is kept
        raise TypeError(
            f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}: {exc}"
        ) from exc


def as_float_matrix(x: object, name: str) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 numpy array ``[N, d]`` with finite values.

    Accepts numpy arrays, torch tensors (detached and moved to the CPU) and nested sequences.
    Integer and float64 inputs are cast to float32. Raises ``ValueError`` for a 1-D or 3-D input,
    an empty set (no rows or no columns) and rows holding NaN or Inf (after the cast, so float64
    values that overflow float32 are caught too); ``TypeError`` for non-numeric input.
    """
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(
            f"{name} must hold real numbers (float or int), got dtype {arr.dtype}; "
            "pass embeddings as a float array"
        )
    if arr.ndim != 2:
        hint = (
            "reshape a single vector to [1, d] with x[None] or a column of scalars to [N, 1]"
            if arr.ndim < 2
            else "flatten per-sample features first, e.g. x.reshape(len(x), -1)"
        )
        raise ValueError(f"{name} must be 2-D [N, d], got shape {tuple(arr.shape)}; {hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(arr.shape)}); it needs at least one row and one column"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    finite_rows = np.isfinite(out).all(axis=1)
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        raise ValueError(
            f"{name} has NaN or Inf in {bad.size} row(s) (first: {bad[:5].tolist()}); "
            "check the encoder output (or values too large for float32) and drop or fix those rows"
        )
    return out


def as_labels(y: object, n: int, name: str) -> np.ndarray:
    """Return ``y`` as an int64 numpy array ``[n]`` of class ids.

    Integer and bool inputs are taken as they are; float inputs must hold whole numbers (``1.0``
    is fine, ``1.5`` or NaN is a ``ValueError``). Strings and other non-numeric labels are a
    ``TypeError``: map them to ids over the union of all label sets first, e.g.
    ``np.unique(all_labels, return_inverse=True)``.
    """
    arr = _to_numpy(y, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        raise ValueError(
            f"{name} must be 1-D [N], got shape {tuple(arr.shape)}; use {name}.reshape(-1)"
        )
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N] (one class id per row), got shape "
                         f"{tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but its embeddings have {n} rows; "
            "pass one label per embedding row"
        )
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.size and arr.max() > 2**63 - 1:
            raise ValueError(f"{name} has class ids too large for int64")
        return np.ascontiguousarray(arr, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} holds NaN or Inf; labels must be integer class ids")
        if not np.array_equal(arr, np.round(arr)):
            bad = np.flatnonzero(arr != np.round(arr))
            raise ValueError(
                f"{name} must hold integer class ids, got non-integer values "
                f"(first at rows {bad[:5].tolist()}: {arr[bad[:3]].tolist()}); "
                "pass integer labels (e.g. y.astype(int64)) or map them with np.unique"
            )
        if np.abs(arr).max(initial=0) >= 2**53:
            raise ValueError(f"{name} has float class ids too large to be exact; use int64")
        return arr.astype(np.int64)
    raise TypeError(
        f"{name} must hold integer class ids, got dtype {arr.dtype}; map other labels to ids "
        "over the union of all label sets first, e.g. np.unique(labels, return_inverse=True)"
    )


def check_k(k: object, name: str = "k", upper: int | None = None, upper_what: str = "") -> int:
    """Return ``k`` as an int if it is a positive integer no larger than ``upper``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"{name} must be a positive integer, got {k}")
    if upper is not None and k > upper:
        raise ValueError(
            f"{name}={k} is larger than {upper_what or 'the number of candidates'} ({upper}); "
            f"use {name} <= {upper}"
        )
    return k


def check_ks(ks: object, name: str = "ks") -> tuple[int, ...]:
    """Return ``ks`` (an int or an iterable of ints) as a sorted tuple of distinct positive ints."""
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, Iterable) or isinstance(ks, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of positive integers, got {ks!r}")
    out = tuple(sorted({check_k(k, f"{name} entry") for k in ks}))
    if not out:
        raise ValueError(f"{name} is empty; pass at least one k, e.g. (1, 2, 4, 8)")
    return out


def check_metric(metric: object, allowed: tuple[str, ...] = METRICS) -> str:
    """Return ``metric`` if it is one of ``allowed``."""
    if metric not in allowed:
        raise ValueError(f"metric must be one of {allowed}, got {metric!r}")
    return metric  # type: ignore[return-value]


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise if the two embedding sets have a different number of columns."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has dimension {a.shape[1]} but {name_b} has {b.shape[1]}; "
            "embed both sets with the same model"
        )


def query_and_reference(query: object, reference: object | None) -> tuple[np.ndarray, np.ndarray]:
    """``(q, r)``: ``query`` as a float matrix and ``reference`` as one of the same dimension,
    or ``r is q`` when ``reference`` is None or the very object ``query``."""
    q = as_float_matrix(query, "query")
    if reference is None or reference is query:
        return q, q
    r = as_float_matrix(reference, "reference")
    check_same_dim(q, r, "query", "reference")
    return q, r


#: float32 scores (inner products, squared distances) must stay below this, with a margin for
#: the rounding of the matrix product's partial sums
_SCORE_LIMIT = float(np.finfo(np.float32).max) / 4


def _max_row_norm(x: np.ndarray) -> float:
    """The largest L2 norm of a row of ``x`` (float32 ``[N, d]``), in float64, by chunks."""
    out = 0.0
    for s in range(0, x.shape[0], 1 << 14):
        blk = x[s : s + (1 << 14)]
        out = max(out, float(np.sqrt(np.einsum("ij,ij->i", blk, blk, dtype=np.float64).max())))
    return out


def check_score_range(query: np.ndarray, reference: np.ndarray, metric: str) -> None:
    """Raise ``ValueError`` if the float32 scores of ``metric`` ("ip" or "l2"; cosine callers
    pass normalised rows and "ip") can overflow: finite embeddings with row norms near 1e19
    give inner products or squared distances (``|q|^2 + |r|^2 - 2 q.r``) of ``inf`` or ``NaN``,
    and neighbours that are silently wrong. Cheap: a bound from the largest absolute values,
    exact row norms only when that bound is too high."""

    def bound(x: np.ndarray) -> float:
        return max(float(x.max()), -float(x.min())) * math.sqrt(x.shape[1])

    def too_large(nq: float, nr: float) -> bool:
        return (nq + nr) ** 2 >= _SCORE_LIMIT if metric == "l2" else nq * nr >= _SCORE_LIMIT

    bq = bound(query)
    br = bq if reference is query else bound(reference)
    if not too_large(bq, br):
        return
    nq = _max_row_norm(query)
    nr = nq if reference is query else _max_row_norm(reference)
    if too_large(nq, nr):
        what = "squared L2 distances" if metric == "l2" else "inner products"
        raise ValueError(
            f"the embeddings are too large: rows of norm up to {nq:.3g} (query) and {nr:.3g} "
            f"(reference) make their {what} overflow float32 (max 3.4e38), so the neighbours "
            "would be wrong; rescale the embeddings (e.g. divide them by their largest row "
            "norm) or use metric='cosine'"
        )
